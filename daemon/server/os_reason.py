"""The operating system's reason for a failed connection, under an HTTP client's wrappers."""

from __future__ import annotations


def os_reason(exc: BaseException) -> str:
    """The operating system's reason under an HTTP client's (and its event loop's) wrappers,
    else the client's own words: "connection refused", "Connection reset by peer"…"""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        grouped = getattr(cause, "exceptions", None)  # one per address tried
        cause = grouped[0] if grouped else cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
