"""The project's one exception hierarchy.

    NDSError
    +-- NotFoundError          a named thing (dataset, job, expert, query) does not exist
    +-- ConflictError          the request clashes with what is stored (duplicate name, busy dataset)
    +-- GoneError              it existed, and what it depends on is gone (a query's deleted dataset)
    +-- InvalidInputError      bad input; carries the name of the offending field
    |   +-- SourceError            a dataset source cannot be read (missing path, bad manifest, corrupt shard)
    |   +-- StorageError           a uri cannot be read (missing, unreadable, unknown scheme)
    +-- PluginError            an unknown or broken plugin name
    +-- VectorStoreError       the vector store failed; third-party errors are translated here
    |   +-- VectorStoreBusyError   the embedded store is locked by another process
    +-- ArtifactError          an artifact could not be written or read
    |   +-- StorageFullError       the artifact store's disk (or quota) is full: retry later
    +-- ServiceUnavailableError  a backing service (broker, database) cannot be reached
    |   +-- StorageUnavailable     the object store does not answer or refuses the credentials
    +-- AuthenticationError    no API key, or one that is unknown or revoked
    +-- PermissionDeniedError  a valid key whose role may not do this
    +-- NDSClientError         anything the client SDK reports (:mod:`nds_client.client`)
        +-- ServerError            the server answered an error (url, status_code, detail, field, hint)
        +-- ServerUnreachable      no answer: connection refused, DNS, timeout (url, reason)
        +-- IntegrityError         a downloaded file does not hash to the sha256 the server lists
        +-- MissingDependencyError an optional package the call needs is not installed (the hint names the extra)
        +-- ClientInputError       a bad argument (also an InvalidInputError, with ``field``)
            +-- TargetError            bad target images or labels

Third-party exceptions are translated in exactly one place per backend
(``raise VectorStoreError(...) from exc``; httpx's in :mod:`nds_client.transport`); the API
maps these classes to HTTP codes.
"""

from __future__ import annotations


class NDSError(Exception):
    """Base class of every error this project raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class NotFoundError(NDSError):
    pass


class ConflictError(NDSError):
    pass


class GoneError(NDSError):
    """What was asked for existed, but what it depends on was deleted or replaced for good."""


class InvalidInputError(NDSError):
    """Bad input. ``field`` names what was wrong, as the user spelled it."""

    def __init__(self, message: str, *, field: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class SourceError(InvalidInputError):
    """A dataset source (folder, manifest) that cannot be registered."""


class StorageError(InvalidInputError):
    """A uri that cannot be read: missing, unreadable, or of a scheme no installed filesystem serves."""

    def __init__(self, message: str, *, field: str = "path", hint: str | None = None) -> None:
        super().__init__(message, field=field, hint=hint)


class StorageMissing(StorageError):
    """The uri names nothing (no such file or object)."""


class StorageTooLarge(StorageError):
    """The file is larger than the limit the reader was given (``size`` and ``limit``, in bytes)."""

    def __init__(self, uri: str, size: int, limit: int) -> None:
        super().__init__(f"{uri}: {size:,} bytes, more than {limit:,}")
        self.size, self.limit = size, limit


class PluginError(NDSError):
    pass


class VectorStoreError(NDSError):
    pass


class VectorStoreBusyError(VectorStoreError):
    pass


class ArtifactError(NDSError):
    pass


class StorageFullError(ArtifactError):
    """No space (ENOSPC) or quota (EDQUOT) left where artifacts are written; the API answers
    503 with Retry-After, and the message names no server path."""

    retry_after = 60


class ServiceUnavailableError(NDSError):
    pass


class StorageUnavailable(ServiceUnavailableError):
    """The object store did not answer, or refused the credentials: nothing was read or stored."""


class AuthenticationError(NDSError):
    pass


class PermissionDeniedError(NDSError):
    pass


# --------------------------------------------------------------------------- the client's


class NDSClientError(NDSError):
    """Base class of every error the client raises."""


class ServerError(NDSClientError):
    """The server answered with an error status; carries its JSON body's detail, field and hint."""

    def __init__(self, message: str, *, url: str, status_code: int, detail: str, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url, self.status_code, self.detail, self.field = url, status_code, detail, field


class ServerUnreachable(NDSClientError):
    """No answer from the server (connection refused, unknown host, timeout, broken connection)."""

    def __init__(self, message: str, *, url: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url, self.reason = url, reason


class IntegrityError(NDSClientError):
    """A downloaded expert's (or backbone's) bytes do not hash to the sha256 the server lists."""


class MissingDependencyError(NDSClientError):
    """An optional package the call needs is not installed; the hint says what to install."""


class ClientInputError(NDSClientError, InvalidInputError):
    """A bad argument; ``field`` names it."""


class TargetError(ClientInputError):
    """Bad target images or labels (empty, unreadable, mismatched, too few per label)."""
