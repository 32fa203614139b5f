"""One HTTP exchange over http.client, bounded by a deadline and a response size, and
abortable from another thread (the gateway abandons it at the deadline)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from stepfleet.egress.hosts import Target
from stepfleet.schemas import HttpResponse

__all__ = ["Exchange", "Plan", "Refused", "failure_text"]

_READ_CHUNK = 64 * 1024


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


class Exchange:
    """One HTTP exchange, run on a pool thread; `abort` ends it from another thread."""

    def __init__(
        self,
        plan: Plan,
        deadline: float,
        connect_timeout_s: float,
        max_response_bytes: int,
        ssl_context: ssl.SSLContext,
    ) -> None:
        self._plan = plan
        self._deadline = deadline
        self._connect_timeout_s = connect_timeout_s
        self._max = max_response_bytes
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def run(self) -> HttpResponse:
        try:
            return self._exchange()
        except (Refused, OSError, http.client.HTTPException) as exc:
            return HttpResponse.failed(failure_text(exc, self._plan.target.host))
        finally:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _exchange(self) -> HttpResponse:
        plan, target = self._plan, self._plan.target
        timeout = min(self._connect_timeout_s, self._left())
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = http.client.HTTPSConnection(
                target.connect_host, target.port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(target.connect_host, target.port, timeout=timeout)
        with self._lock:
            if self._aborted:
                raise TimeoutError
            self._conn = conn
        conn.connect()
        with self._lock:
            if self._aborted:
                raise TimeoutError
        assert conn.sock is not None
        conn.sock.settimeout(self._left())
        # One exchange per connection: the connection is closed once the answer is read.
        sent = {**plan.headers, "Connection": "close"}
        conn.request(plan.method, target.path, body=plan.body, headers=sent)
        conn.sock.settimeout(self._left())
        response = conn.getresponse()
        declared = response.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max:
            raise Refused(
                f"response body of {int(declared)} bytes is over the limit of {self._max}"
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(self._left())
            piece = response.read(min(_READ_CHUNK, self._max + 1 - total))
            if not piece:
                break
            total += len(piece)
            if total > self._max:
                raise Refused(f"response body is over the limit of {self._max} bytes")
            chunks.append(piece)
        headers: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = b"".join(chunks).decode("utf-8", errors="replace")
        return HttpResponse(response.status, headers, body)
