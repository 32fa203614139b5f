"""HTTP exchanges on one shared aiohttp.ClientSession: pooled keep-alive connections, many calls
in flight on the event loop.

The caller bounds each exchange with its deadline (the gateway's asyncio timeout); here only
the connection (the name lookup, TCP and TLS) has a timeout of its own. What goes on the wire is
the plan's: no proxy from the environment, no cookies kept, no redirect followed, no request
sent twice, no header added but Host, Content-Length and `Accept-Encoding: identity` (the guest
may set another; the body comes back as sent).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import aiohttp
from yarl import URL

from stepfleet.egress.transport import Plan, Refused, failure_text
from stepfleet.schemas import HttpResponse

__all__ = ["PooledTransport"]

_SKIPPED_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
"""Headers aiohttp would add to a request on its own (the gateway's plan says which go out)."""

_KEEPALIVE_S = 5.0
"""How long an idle connection is kept for the next call to its host."""

_MAX_HEAD_LINE = 16 * 1024
"""The longest status or header line of a response (aiohttp's default is 8190)."""

_MAX_HEADERS = 4096
"""The most header lines of a response (aiohttp's default is 128)."""


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, but a DELETE without a body goes out without `Content-Length: 0`, as
    http.client sends it (aiohttp adds it for every method but GET, HEAD, OPTIONS and TRACE;
    guests cannot set Content-Length, so any there is aiohttp's)."""

    def update_body_from_data(self, body: Any, _stacklevel: int = 3) -> None:
        super().update_body_from_data(body, _stacklevel + 1)
        if body is None:
            self.headers.popall("Content-Length", None)


class _LookupWithin(aiohttp.ThreadedResolver):
    """getaddrinfo in a thread, as the standard library does it, bounded by the connect timeout
    (aiohttp's own connect timeout covers only TCP and TLS)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        async with asyncio.timeout(self._timeout_s):
            return await super().resolve(host, port, family)


class PooledTransport:
    """Exchanges on one aiohttp.ClientSession (at most `max_connections` connections, kept
    alive per host), created on the first call's event loop."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        max_response_bytes: int,
        ssl_context: ssl.SSLContext,
    ) -> None:
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._max = max_response_bytes
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _session_here(self) -> aiohttp.ClientSession:
        """The session, made on the first call's event loop."""
        loop = asyncio.get_running_loop()
        if self._session is None:
            self._session = self._new_session()
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("the egress gateway's async calls must all run on one event loop")
        return self._session

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=_KEEPALIVE_S,
            ssl=self._ssl,
            # Looked up for each new connection, as the standard library does: no cache.
            use_dns_cache=False,
            resolver=_LookupWithin(self._connect_timeout_s),
        )
        session = aiohttp.ClientSession(
            connector=connector,
            request_class=_Request,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            # As http.client does: the guest gets the body as the server sent it.
            headers={"Accept-Encoding": "identity"},
            skip_auto_headers=_SKIPPED_AUTO_HEADERS,
            auto_decompress=False,
            # The caller's deadline bounds everything; the connection also has its own limit.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
            max_line_size=_MAX_HEAD_LINE,
            max_field_size=_MAX_HEAD_LINE,
            max_headers=_MAX_HEADERS,
        )
        # aiohttp sends an idempotent request again when a reused connection fails before the
        # answer; the server may have acted on the first, and a guest's call is made once.
        # (No option says so: the attribute is aiohttp's own, held by
        # tests/unit/test_egress.py::test_a_request_is_never_sent_twice.)
        session._retry_connection = False
        return session

    async def aclose(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        session, self._session, self._loop = self._session, None, None
        if session is not None:
            await session.close()

    async def exchange(self, plan: Plan) -> HttpResponse:
        """Make the call; every failure of the network or the server is an error answer."""
        session = self._session_here()
        try:
            return await self._exchange(session, plan)
        except aiohttp.ServerDisconnectedError:
            # http.client's name for it, so every transport says the same.
            return HttpResponse.failed("invalid HTTP response (RemoteDisconnected)")
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError):
            # A malformed status line or head, or a body cut short: the guest's text as before.
            return HttpResponse.failed("invalid HTTP response (RemoteProtocolError)")
        except aiohttp.ClientConnectorCertificateError as exc:
            return HttpResponse.failed(failure_text(exc.certificate_error, plan.target.host))
        except aiohttp.ClientConnectorError as exc:
            return HttpResponse.failed(failure_text(_root_cause(exc.os_error), plan.target.host))
        except (Refused, OSError, aiohttp.ClientError) as exc:
            return HttpResponse.failed(failure_text(_root_cause(exc), plan.target.host))
        except ValueError:
            # aiohttp sends no header value with a control character (tab aside).
            return HttpResponse.failed("request failed (control character in a header value)")

    async def _exchange(self, session: aiohttp.ClientSession, plan: Plan) -> HttpResponse:
        target = plan.target
        response = await session.request(
            plan.method,
            URL(f"{target.scheme}://{target.authority}{target.path}", encoded=True),
            headers={name: _wire_text(value) for name, value in plan.headers.items()},
            data=plan.body,
            allow_redirects=False,
        )
        try:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > self._max:
                raise Refused(
                    f"response body of {int(declared)} bytes is over the limit of {self._max}"
                )
            chunks: list[bytes] = []
            total = 0
            async for piece in response.content.iter_any():
                total += len(piece)
                if total > self._max:
                    raise Refused(f"response body is over the limit of {self._max} bytes")
                chunks.append(piece)
        except BaseException:
            response.close()  # the rest of the body is not read: the connection is not reused
            raise
        response.release()
        headers: dict[str, str] = {}
        for raw_name, raw_value in response.raw_headers:
            key, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = b"".join(chunks).decode("utf-8", errors="replace")
        return HttpResponse(response.status, headers, body)


def _wire_text(value: str) -> str:
    """The text aiohttp writes (as UTF-8) as `value`'s Latin-1 bytes, as http.client sends a
    header value; where those bytes are not UTF-8, `value` itself."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value


def _root_cause(exc: BaseException) -> BaseException:
    """The exception aiohttp's wrappers were raised from: the refused connection, failed lookup
    or TLS error the guest is told of."""
    seen: set[int] = set()
    # A timeout is the cause (asyncio's is raised from the CancelledError that stopped the wait).
    while id(exc) not in seen and not isinstance(exc, TimeoutError):
        seen.add(id(exc))
        cause = exc.__cause__
        if cause is None:
            break
        exc = cause
    return exc
