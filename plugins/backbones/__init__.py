"""Built-in embedding backbone plugins (``nds.backbones``): turn images into vectors of one embedding space.

They import only :mod:`nds.plugins.contract`, ``nds.catalog.model`` (to train and export the
default backbone) and ``nds_client``, like a third-party backbone would.
"""
