"""Built-in dataset source plugins (``nds.sources``): each turns a path into (uri, label) items to register.

They import only :mod:`nds.plugins.contract` and ``nds_client``, like a third-party source would.
"""
