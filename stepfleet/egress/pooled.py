"""HTTP exchanges on one shared httpx.AsyncClient: pooled keep-alive connections, many calls in
flight on the event loop.

The caller bounds each exchange with its deadline (the gateway's asyncio timeout); here only
the connection (TCP, TLS, and the name lookup before it) has a timeout of its own. What goes
on the wire is the plan's: no proxy from the environment, no cookies kept, no redirect followed, no header added but Host, Content-Length and
`Accept-Encoding: identity` (the guest may set another; the body comes back as sent).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ssl
import urllib.request

import httpx

from stepfleet.egress.transport import Plan, Refused, failure_text
from stepfleet.schemas import HttpResponse

__all__ = ["PooledTransport"]

_CLIENT_DEFAULT_HEADERS = ("Accept", "Connection", "User-Agent")
"""Headers httpx would add to every request; the sync transport sends none of them."""


class _NoCookies(http.cookiejar.CookiePolicy):
    """Store no cookie and send none: calls of different tenants share the client."""

    netscape = True
    rfc2965 = False
    hide_cookie2 = False

    def set_ok(self, cookie: http.cookiejar.Cookie, request: urllib.request.Request) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: urllib.request.Request) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: urllib.request.Request) -> bool:
        return False

    def path_return_ok(self, path: str, request: urllib.request.Request) -> bool:
        return False


_SHARD_CONNECTIONS = 32
"""Connections per httpx client. httpcore's pool walks all its connections on every request
and release (and polls each idle socket), so one pool with hundreds of calls in flight spends
most of the worker's CPU on that bookkeeping; several small pools keep each walk short."""


class PooledTransport:
    """Exchanges on a few httpx.AsyncClients (together at most `max_connections` connections),
    created on the first call's event loop; each call takes the least busy one."""

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
        self._clients: list[httpx.AsyncClient] = []
        self._busy: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _least_busy(self) -> int:
        """The index of the client with the fewest calls in flight (made on first use)."""
        loop = asyncio.get_running_loop()
        if not self._clients:
            shards = -(-self._max_connections // _SHARD_CONNECTIONS)
            size = -(-self._max_connections // shards)
            self._clients = [self._new_client(size) for _ in range(shards)]
            self._busy = [0] * shards
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("the egress gateway's async calls must all run on one event loop")
        return self._busy.index(min(self._busy))

    def _new_client(self, max_connections: int) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            verify=self._ssl,
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
            trust_env=False,
            follow_redirects=False,
            # The caller's deadline bounds everything; the connection also has its own limit.
            timeout=httpx.Timeout(None, connect=self._connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        for name in _CLIENT_DEFAULT_HEADERS:
            del client.headers[name]
        # As http.client does: the guest gets the body as the server sent it.
        client.headers["Accept-Encoding"] = "identity"
        return client

    async def aclose(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        clients, self._clients, self._busy, self._loop = self._clients, [], [], None
        for client in clients:
            await client.aclose()

    async def exchange(self, plan: Plan) -> HttpResponse:
        """Make the call; every failure of the network or the server is an error answer."""
        index = self._least_busy()
        self._busy[index] += 1
        try:
            return await self._exchange(self._clients[index], plan)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" in str(exc):
                # http.client's name for it, so both transports say the same.
                return HttpResponse.failed("invalid HTTP response (RemoteDisconnected)")
            return HttpResponse.failed(f"invalid HTTP response ({type(exc).__name__})")
        except (Refused, OSError, httpx.HTTPError, httpx.InvalidURL) as exc:
            return HttpResponse.failed(failure_text(_root_cause(exc), plan.target.host))
        finally:
            if self._busy:  # not closed meanwhile
                self._busy[index] -= 1

    async def _exchange(self, client: httpx.AsyncClient, plan: Plan) -> HttpResponse:
        target = plan.target
        request = client.build_request(
            plan.method,
            httpx.URL(
                scheme=target.scheme,
                host=target.connect_host,
                port=target.port,
                raw_path=target.path.encode("ascii"),
            ),
            # Bytes, so Latin-1 values go out as http.client sends them.
            headers=[
                (name.encode("ascii"), value.encode("latin-1"))
                for name, value in plan.headers.items()
            ],
            content=plan.body,
        )
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > self._max:
                raise Refused(
                    f"response body of {int(declared)} bytes is over the limit of {self._max}"
                )
            chunks: list[bytes] = []
            total = 0
            async for piece in response.aiter_raw():
                total += len(piece)
                if total > self._max:
                    raise Refused(f"response body is over the limit of {self._max} bytes")
                chunks.append(piece)
        finally:
            await response.aclose()
        headers: dict[str, str] = {}
        for raw_name, raw_value in response.headers.raw:
            key, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = b"".join(chunks).decode("utf-8", errors="replace")
        return HttpResponse(response.status_code, headers, body)


def _root_cause(exc: BaseException) -> BaseException:
    """The exception httpx's (and httpcore's, and anyio's) wrappers were raised from: the
    refused connection, failed lookup or TLS error the guest is told of."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        # httpcore re-raises its errors `from None`: what they wrap is left as the context.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]  # one per address tried: the first says it
        if cause is None:
            break
        exc = cause
    return exc
