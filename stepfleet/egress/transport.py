"""What goes on the wire (`Plan`), a refusal (`Refused`), and how a failed exchange reads to
the guest (`failure_text`)."""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass

from stepfleet.egress.hosts import Target

__all__ = ["Plan", "Refused", "failure_text"]


class Refused(Exception):
    """The call is not allowed; the message is for the guest."""


@dataclass(slots=True)
class Plan:
    """A checked call, secrets added: exactly what goes on the wire."""

    method: str
    target: Target
    headers: dict[str, str]
    body: bytes | None


def failure_text(exc: BaseException, host: str) -> str:
    """What the guest is told of an exchange that failed with `exc` (on its way to `host`)."""
    # Subclasses before their bases: TLS and resolution errors, refused connections and
    # timeouts are all OSErrors.
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.HTTPException):
        return f"invalid HTTP response ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"connection failed: {exc.strerror or type(exc).__name__}"
    return f"request failed ({type(exc).__name__})"
