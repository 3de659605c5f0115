"""Every kind of job the catalog runs, registered in :mod:`nds.catalog.jobs` on import.

Each module that implements a kind registers it when it is imported; importing this
module imports them all. Whatever runs jobs (the API's dispatchers, the CLI, the Celery
worker) imports it, so that :func:`nds.catalog.jobs.run_job` finds every kind.
"""

from __future__ import annotations

from nds.catalog import indexing, registration, sync  # noqa: F401 - imported to register their job kinds
