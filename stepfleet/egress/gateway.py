"""EgressGateway: guests' HTTP calls, within each tenant's allow list, with injected secrets.

It implements the sandbox's `Egress` port (stepfleet/sandbox/port.py) with http.client:

- http and https only; the URL's host must be an entry of the tenant's allow list as written
  (stepfleet/egress/hosts.py): ports 80 and 443 for a bare `host`, the entry's port otherwise;
  no userinfo; no redirect is followed (a 3xx is the answer);
- a secret configured for (tenant, host) is added as `header: value`, replacing a header of the
  same name the guest set, and is scrubbed from everything the guest gets back (status line
  aside: response headers, body and error messages), including its URL- and JSON-escaped forms
  and, for a value like `Bearer TOKEN`, the token alone;
- a secret is only sent over https, or over http to a loopback host, unless the gateway is
  built with allow_secrets_over_http;
- each call is bounded by a wall-clock deadline (connection, TLS, request and response alike,
  name resolution too: the exchange runs on a small thread pool and is abandoned at the
  deadline), and the response body by max_response_bytes.

Neither a secret nor a request's headers is ever logged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

import structlog

from stepfleet.egress.hosts import HostError, Target, entry_matches, normalize_host_entry, parse_url
from stepfleet.schemas import REDACTED, HttpRequest, HttpResponse

log = structlog.get_logger("stepfleet.egress")

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods a guest may use (no CONNECT, no TRACE)."""

RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-connection",
        "proxy-authorization",
    }
)
"""Headers the gateway sets or that change how the connection works: guests may not set them,
and a secret may not be sent in them."""

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SCRUB_PART_MIN = 8
"""A secret value's space-separated parts this long are scrubbed on their own too (the token of
`Bearer TOKEN`)."""
_READ_CHUNK = 64 * 1024


class _Refused(Exception):
    """The call is not allowed; the message is for the guest."""


def is_header_name(name: str) -> bool:
    """Tell whether `name` is an HTTP header name (a token)."""
    return _TOKEN.fullmatch(name) is not None


def _header_value_ok(value: str) -> bool:
    if any(c in value for c in "\r\n\0"):
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def check_secret_header(header: str) -> str:
    """The header a secret may be sent in, as given; ValueError if it may not be one."""
    if not is_header_name(header):
        raise ValueError(f"{header!r} is not an HTTP header name")
    if header.lower() in RESERVED_HEADERS:
        raise ValueError(f"a secret cannot be sent in the {header} header")
    return header


def check_secret_value(value: str) -> None:
    """ValueError (saying nothing of the value) if it cannot be a header value."""
    if not value:
        raise ValueError("the secret value is empty")
    if not _header_value_ok(value):
        raise ValueError(
            "the secret value cannot be sent in a header "
            "(no line breaks or NUL; Latin-1 characters only)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _needles(value: str) -> set[str]:
    """The forms of a secret value that are scrubbed from answers."""
    bases = {value} | {part for part in value.split() if len(part) >= _SCRUB_PART_MIN}
    forms: set[str] = set()
    for base in bases:
        forms |= {base, quote(base, safe=""), quote_plus(base), json.dumps(base)[1:-1]}
    return {form for form in forms if form}


@dataclass(frozen=True, slots=True)
class _Secret:
    host: str
    header: str
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One configuration, replaced whole by `configure` (so a call sees one or the other)."""

    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    secrets: Mapping[str, tuple[_Secret, ...]] = field(default_factory=dict, repr=False)
    scrubbers: Mapping[str, re.Pattern[str]] = field(default_factory=dict, repr=False)


@dataclass(slots=True)
class _Plan:
    method: str
    target: Target
    headers: dict[str, str]
    body: bytes | None


class _Exchange:
    """One HTTP exchange, run on a pool thread; `abort` ends it from another thread."""

    def __init__(
        self,
        plan: _Plan,
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
        except _Refused as exc:
            return HttpResponse.failed(str(exc))
        except TimeoutError:
            return HttpResponse.failed("timed out")
        except ssl.SSLCertVerificationError as exc:
            return HttpResponse.failed(f"TLS certificate verification failed: {exc.verify_message}")
        except ssl.SSLError as exc:
            return HttpResponse.failed(f"TLS error: {exc.reason or type(exc).__name__}")
        except socket.gaierror:
            return HttpResponse.failed(f"cannot resolve host {self._plan.target.host}")
        except ConnectionRefusedError:
            return HttpResponse.failed("connection refused")
        except http.client.HTTPException as exc:
            return HttpResponse.failed(f"invalid HTTP response ({type(exc).__name__})")
        except OSError as exc:
            return HttpResponse.failed(f"connection failed: {exc.strerror or type(exc).__name__}")
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
        conn.request(plan.method, target.path, body=plan.body, headers=plan.headers)
        conn.sock.settimeout(self._left())
        response = conn.getresponse()
        declared = response.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max:
            raise _Refused(
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
                raise _Refused(f"response body is over the limit of {self._max} bytes")
            chunks.append(piece)
        headers: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = b"".join(chunks).decode("utf-8", errors="replace")
        return HttpResponse(response.status, headers, body)


class EgressGateway:
    """The worker's egress gateway (implements stepfleet.sandbox.Egress); thread-safe.

    call_timeout_s: the longest one call may take, everything included (the sandbox further
        bounds it by the time left in the step).
    connect_timeout_s: the longest the TCP (and TLS) connection may take, within that.
    max_response_bytes: the largest response body handed to a guest; larger ones are refused
        (pass the sandbox's value limit, STEPFLEET_VALUE_BYTES).
    max_workers: threads running exchanges; one guest calls at a time per worker process, the
        rest absorb exchanges abandoned at their deadline (a hung name lookup).
    ssl_context: for https; default: the system's trust store, certificates and host names
        verified.
    allow_secrets_over_http: also send secrets over plain http to non-loopback hosts.
    user_agent: the User-Agent sent when the guest sets none.
    """

    def __init__(
        self,
        *,
        call_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_response_bytes: int = 1024 * 1024,
        max_workers: int = 4,
        ssl_context: ssl.SSLContext | None = None,
        allow_secrets_over_http: bool = False,
        user_agent: str = "stepfleet-egress",
    ) -> None:
        if call_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must not be negative")
        self._call_timeout_s = call_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_response_bytes = max_response_bytes
        self._ssl = ssl_context or ssl.create_default_context()
        self._allow_secrets_over_http = allow_secrets_over_http
        self._user_agent = user_agent
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="egress"
        )
        self._snapshot = _Snapshot()

    @property
    def call_timeout_s(self) -> float:
        return self._call_timeout_s

    def close(self) -> None:
        """Stop the exchange threads (calls still running are abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- configuration -------------------------------------------------------------------

    def configure(
        self,
        allowed: Mapping[str, Iterable[str]],
        secrets: Iterable[tuple[str, str, str, str]],
    ) -> list[str]:
        """Replace the allow lists and secrets (what the worker loaded from the store).

        `allowed`: tenant -> host entries; `secrets`: (tenant, host, header, plaintext), as
        `open_secrets` returns them. Entries and secrets that are not valid are left out, with
        one message each in the returned list (also logged); messages never hold a value.
        """
        problems: list[str] = []
        hosts: dict[str, frozenset[str]] = {}
        for tenant, entries in allowed.items():
            kept: set[str] = set()
            for entry in entries:
                try:
                    kept.add(normalize_host_entry(entry))
                except HostError as exc:
                    problems.append(f"tenant {tenant}: allow-list entry left out: {exc}")
            hosts[tenant] = frozenset(kept)
        by_tenant: dict[str, dict[tuple[str, str], _Secret]] = {}
        for tenant, host, header, value in secrets:
            try:
                canonical = normalize_host_entry(host)
                check_secret_header(header)
                check_secret_value(value)
            except ValueError as exc:
                problems.append(f"tenant {tenant}: secret for {host} ({header}) left out: {exc}")
                continue
            slot = (canonical, header.lower())
            if slot in by_tenant.setdefault(tenant, {}):
                problems.append(
                    f"tenant {tenant}: two secrets for the {header} header of {canonical}; "
                    "the last one is used"
                )
            by_tenant[tenant][slot] = _Secret(canonical, header, value)
        scrubbers: dict[str, re.Pattern[str]] = {}
        for tenant, found in by_tenant.items():
            needles = set().union(*(_needles(secret.value) for secret in found.values()))
            ordered = sorted(needles, key=lambda needle: (-len(needle), needle))
            scrubbers[tenant] = re.compile(
                "|".join(re.escape(needle) for needle in ordered), re.IGNORECASE
            )
        self._snapshot = _Snapshot(
            hosts,
            {tenant: tuple(found.values()) for tenant, found in by_tenant.items()},
            scrubbers,
        )
        for problem in problems:
            log.warning("egress_misconfigured", problem=problem)
        return problems

    # -- calls ---------------------------------------------------------------------------

    def request(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Perform one call for `tenant`; refusals and failures come back as errors."""
        snapshot = self._snapshot
        started = time.monotonic()
        timeout = min(timeout_s, self._call_timeout_s)
        try:
            plan = self._plan(snapshot, tenant, request)
        except _Refused as exc:
            answer = HttpResponse.failed(str(exc))
            self._log(tenant, request.method, None, answer, started)
            return self._scrubbed(snapshot, tenant, answer)
        if timeout <= 0:
            answer = HttpResponse.failed("no time left for the call")
        else:
            exchange = _Exchange(
                plan,
                started + timeout,
                self._connect_timeout_s,
                self._max_response_bytes,
                self._ssl,
            )
            future = self._pool.submit(exchange.run)
            try:
                answer = future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                exchange.abort()
                answer = HttpResponse.failed(f"timed out after {timeout:.3g} s")
        self._log(tenant, plan.method, plan.target, answer, started)
        return self._scrubbed(snapshot, tenant, answer)

    def _plan(self, snapshot: _Snapshot, tenant: str, request: HttpRequest) -> _Plan:
        method = request.method.upper()
        if method not in METHODS:
            raise _Refused(
                f"method {request.method!r} is not allowed ({', '.join(sorted(METHODS))})"
            )
        try:
            target = parse_url(request.url)
        except HostError as exc:
            raise _Refused(f"URL refused: {exc}") from None
        entries = snapshot.allowed.get(tenant, frozenset())
        if not any(entry_matches(entry, target.host, target.port) for entry in entries):
            raise _Refused(
                f"{target.host} port {target.port} is not on the egress allow list of tenant "
                f"{tenant!r}"
            )
        headers: dict[str, tuple[str, str]] = {}
        for name, value in request.headers.items():
            if not is_header_name(name):
                raise _Refused(f"header name {name!r} is not valid")
            if name.lower() in RESERVED_HEADERS:
                raise _Refused(f"header {name!r} may not be set by a guest")
            if not _header_value_ok(value):
                raise _Refused(
                    f"header {name!r} has a value with line breaks, NUL or non-Latin-1 text"
                )
            headers[name.lower()] = (name, value)
        secrets = [
            secret
            for secret in snapshot.secrets.get(tenant, ())
            if entry_matches(secret.host, target.host, target.port)
        ]
        if (
            secrets
            and target.scheme == "http"
            and not self._allow_secrets_over_http
            and not _is_loopback(target.host)
        ):
            raise _Refused(f"a secret is configured for {target.host}: it is only sent over https")
        for secret in secrets:
            headers[secret.header.lower()] = (secret.header, secret.value)
        headers.setdefault("user-agent", ("User-Agent", self._user_agent))
        headers["connection"] = ("Connection", "close")
        try:
            body = request.body.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("the request body is not valid Unicode text") from None
        if not body and method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            payload: bytes | None = None
        else:
            payload = body
        return _Plan(method, target, dict(headers.values()), payload)

    def _scrubbed(self, snapshot: _Snapshot, tenant: str, answer: HttpResponse) -> HttpResponse:
        pattern = snapshot.scrubbers.get(tenant)
        if pattern is None:
            return answer

        def scrub(text: str) -> str:
            return pattern.sub(REDACTED, text)

        if answer.error is not None:
            return HttpResponse.failed(scrub(answer.error))
        headers: dict[str, str] = {}
        for name, value in answer.headers.items():
            key = scrub(name)
            headers[key] = f"{headers[key]}, {scrub(value)}" if key in headers else scrub(value)
        return HttpResponse(answer.status, headers, scrub(answer.body))

    @staticmethod
    def _log(
        tenant: str, method: str, target: Target | None, answer: HttpResponse, started: float
    ) -> None:
        # Method, scheme, host and port only: never the path, the headers or the body.
        where = f"{target.scheme}://{target.authority}" if target is not None else "(refused)"
        outcome = str(answer.status) if answer.error is None else "error"
        log.info(
            "egress_call",
            tenant=tenant,
            method=method[:16],
            to=where,
            outcome=outcome,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
