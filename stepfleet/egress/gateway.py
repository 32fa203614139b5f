"""EgressGateway: guests' HTTP calls, within each tenant's allow list, with injected secrets.

`call` is awaited on the worker's event loop (one pooled aiohttp session, many calls in flight,
pooled.py) while the step that asked for it waits without a transaction, a row lock or the
guest thread (stepfleet/cycle/calls.py). request_checks.py says what a call may be, secrets.py
adds and scrubs secrets, transport.py holds what goes on the wire and how failures read:

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
  name resolution and waiting for a pooled connection too: an asyncio timeout cancels the
  call), and the response body by max_response_bytes;
- no cookie is kept between calls, and no proxy is taken from the environment.

Neither a secret nor a request's headers is ever logged.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from stepfleet.egress.hosts import HostError, Target, normalize_host_entry
from stepfleet.egress.pooled import PooledTransport
from stepfleet.egress.request_checks import check_secret_header, check_secret_value, plan_call
from stepfleet.egress.secrets import Secret, scrubbed, scrubber
from stepfleet.egress.transport import Plan, Refused
from stepfleet.schemas import HttpRequest, HttpResponse

log = structlog.get_logger("stepfleet.egress")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One configuration, replaced whole by `configure` (so a call sees one or the other)."""

    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict, repr=False)
    scrubbers: Mapping[str, re.Pattern[str]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A call that passed the checks, on its way to the host."""

    tenant: str
    plan: Plan
    started: float
    """time.monotonic() when the guest asked."""
    timeout: float
    scrub: re.Pattern[str] | None = field(repr=False)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def timed_out(self) -> HttpResponse:
        return HttpResponse.failed(f"timed out after {self.timeout:.3g} s")


class EgressGateway:
    """The worker's egress gateway (implements stepfleet.cycle.calls.Caller): the guests'
    calls, made on the event loop, which all of a gateway's `call`s must share (its connection
    pool is created on the first).

    call_timeout_s: the longest one call may take, everything included (the sandbox further
        bounds it by the time left in the step).
    connect_timeout_s: the longest the TCP (and TLS) connection may take, within that.
    max_response_bytes: the largest response body handed to a guest; larger ones are refused
        (pass the sandbox's value limit, STEPFLEET_VALUE_BYTES).
    max_connections: the most connections `call` keeps open at once, in use or kept alive for
        the next call to the same host (one pool for all hosts and tenants); more calls wait
        for one, within their deadline.
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
        max_connections: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
        allow_secrets_over_http: bool = False,
        user_agent: str = "stepfleet-egress",
    ) -> None:
        if call_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must not be negative")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._call_timeout_s = call_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_response_bytes = max_response_bytes
        self._ssl = ssl_context or ssl.create_default_context()
        self._allow_secrets_over_http = allow_secrets_over_http
        self._user_agent = user_agent
        self._pooled = PooledTransport(
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            max_response_bytes=max_response_bytes,
            ssl_context=self._ssl,
        )
        self._snapshot = _Snapshot()

    @property
    def call_timeout_s(self) -> float:
        return self._call_timeout_s

    async def aclose(self) -> None:
        """Close the pooled connections of `call`, on the loop that made the calls."""
        await self._pooled.aclose()

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
        by_tenant: dict[str, dict[tuple[str, str], Secret]] = {}
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
            by_tenant[tenant][slot] = Secret(canonical, header, value)
        scrubbers: dict[str, re.Pattern[str]] = {}
        for tenant, found in by_tenant.items():
            scrubbers[tenant] = scrubber(found.values())
        self._snapshot = _Snapshot(
            hosts,
            {tenant: tuple(found.values()) for tenant, found in by_tenant.items()},
            scrubbers,
        )
        for problem in problems:
            log.warning("egress_misconfigured", problem=problem)
        return problems

    # -- calls ---------------------------------------------------------------------------

    async def call(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Perform one call for `tenant`; refusals and failures come back as errors.

        Made on the gateway's pooled aiohttp session, on the event loop every `call` of a gateway
        shares (many calls in flight at once, no thread per call)."""
        pending = self._begin(tenant, request, timeout_s)
        if isinstance(pending, HttpResponse):
            return pending
        try:
            async with asyncio.timeout(pending.deadline - time.monotonic()):
                answer = await self._pooled.exchange(pending.plan)
        except TimeoutError:
            answer = pending.timed_out()
        return self._end(pending, answer)

    def _begin(
        self, tenant: str, request: HttpRequest, timeout_s: float
    ) -> _Pending | HttpResponse:
        """The checked call to make, or the answer already (a refusal; no time left)."""
        snapshot = self._snapshot
        started = time.monotonic()
        scrub = snapshot.scrubbers.get(tenant)
        try:
            plan = plan_call(
                tenant,
                request,
                snapshot.allowed.get(tenant, frozenset()),
                snapshot.secrets.get(tenant, ()),
                allow_secrets_over_http=self._allow_secrets_over_http,
                user_agent=self._user_agent,
            )
        except Refused as exc:
            answer = HttpResponse.failed(str(exc))
            self._log(tenant, request.method, None, answer, started)
            return scrubbed(scrub, answer)
        pending = _Pending(tenant, plan, started, min(timeout_s, self._call_timeout_s), scrub)
        if pending.timeout <= 0:
            return self._end(pending, HttpResponse.failed("no time left for the call"))
        return pending

    def _end(self, pending: _Pending, answer: HttpResponse) -> HttpResponse:
        """Log the call and give the guest its answer, secrets scrubbed."""
        self._log(pending.tenant, pending.plan.method, pending.plan.target, answer, pending.started)
        return scrubbed(pending.scrub, answer)

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
