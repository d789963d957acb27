"""One root for every error the collector raises on purpose.

The API turns a ``CollectorError`` into ``{"error": code, "detail": ...}`` with its
``status``; the CLI prints ``detail`` on one line and exits with ``exit_code``::

    CollectorError
    ├── ConfigError          invalid configuration (exit 2)
    ├── StorageError         the database cannot be reached or written
    │   └── DatabaseUnreachable  no connection at all (the spool takes over)
    ├── InputError           a request or CLI argument is malformed (400)
    │   ├── NotFound         the thing named does not exist (404)
    │   ├── Conflict         well formed, but clashes with what is there (409)
    │   └── Unprocessable    well formed, but refused as it stands (422), e.g. a network
    │                        block wider than the limit without force, an expiry in the past
    └── AuthError            missing or bad credentials (401)
        └── Forbidden        valid credentials, wrong role (403)
"""

from __future__ import annotations


class CollectorError(Exception):
    status = 400
    code = "error"
    exit_code = 1

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(CollectorError):
    code = "config_error"
    exit_code = 2


class StorageError(CollectorError):
    status = 503
    code = "storage_unavailable"


class DatabaseUnreachable(StorageError):
    """The server did not answer (refused, reset, shutting down): worth spooling, not fixing."""


class InputError(CollectorError):
    code = "bad_request"


class NotFound(InputError):
    status = 404
    code = "not_found"


class Conflict(InputError):
    status = 409
    code = "conflict"


class Unprocessable(InputError):
    status = 422
    code = "unprocessable"


class AuthError(CollectorError):
    status = 401
    code = "unauthorized"


class Forbidden(AuthError):
    status = 403
    code = "forbidden"
