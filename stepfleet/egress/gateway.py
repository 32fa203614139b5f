"""EgressGateway: guests' HTTP calls, within each tenant's allow list, with injected secrets.

It implements the sandbox's `Egress` port (stepfleet/sandbox/port.py) with http.client
(request_checks.py says what a call may be, secrets.py adds and scrubs secrets, transport.py
makes the exchange):

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
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import structlog

from stepfleet.egress.hosts import HostError, Target, normalize_host_entry
from stepfleet.egress.request_checks import check_secret_header, check_secret_value, plan_call
from stepfleet.egress.secrets import Secret, scrubbed, scrubber
from stepfleet.egress.transport import Exchange, Refused
from stepfleet.schemas import HttpRequest, HttpResponse

log = structlog.get_logger("stepfleet.egress")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One configuration, replaced whole by `configure` (so a call sees one or the other)."""

    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict, repr=False)
    scrubbers: Mapping[str, re.Pattern[str]] = field(default_factory=dict, repr=False)


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

    def request(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Perform one call for `tenant`; refusals and failures come back as errors."""
        snapshot = self._snapshot
        started = time.monotonic()
        timeout = min(timeout_s, self._call_timeout_s)
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
            return scrubbed(snapshot.scrubbers.get(tenant), answer)
        if timeout <= 0:
            answer = HttpResponse.failed("no time left for the call")
        else:
            exchange = Exchange(
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
        return scrubbed(snapshot.scrubbers.get(tenant), answer)

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
