"""Errors the data plane raises. They know nothing of gRPC: the one mapping to
status codes lives in serve/frontend/grpc_errors.py (the error map in docs/design.md)."""


class ServeError(Exception):
    """Base class. `code` names the gRPC status the front end answers with."""
    code = "INTERNAL"


class InvalidArgument(ServeError):
    """The client's input is wrong (name, dtype, shape, bytes, ids, state, text)."""
    code = "INVALID_ARGUMENT"


class FailedPrecondition(ServeError):
    """The request is well formed but does not fit the server's state (a sequence step out of order)
    or the model (the text API on a model without a vocabulary)."""
    code = "FAILED_PRECONDITION"


class NotFound(ServeError):
    """Unknown model or version."""
    code = "NOT_FOUND"


class Unavailable(ServeError):
    """Model loading / failed to load, queue full, too many live sequences, shutting down."""
    code = "UNAVAILABLE"


class ResourceExhausted(ServeError):
    """Too many open streams or calls in progress (serve/frontend/limits.py)."""
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it ran."""
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServeError):
    code = "CANCELLED"


class PermissionDenied(ServeError):
    """The caller may not do this: a role without the right, or model control switched off."""
    code = "PERMISSION_DENIED"


class Unauthenticated(ServeError):
    """No valid credentials (a missing or unknown bearer token)."""
    code = "UNAUTHENTICATED"


QUOTE_CHARS = 100   # client strings quoted in messages are cut to this many characters


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """A client-supplied value for an error message: repr'd, cut to about `limit` characters, so a
    huge name cannot blow up the status (gRPC carries it in a size-limited header)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
