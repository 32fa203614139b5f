"""Secrets on the wire: added to a tenant's calls to their host, and scrubbed from every answer
the guest gets back, in the forms a server may echo them."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

from stepfleet.egress.hosts import Target, entry_matches
from stepfleet.egress.transport import Refused
from stepfleet.schemas import REDACTED, HttpResponse

__all__ = ["Secret", "add_secrets", "scrubbed", "scrubber"]

_SCRUB_PART_MIN = 8
"""A secret value's space-separated parts this long are scrubbed on their own too (the token of
`Bearer TOKEN`)."""


@dataclass(frozen=True, slots=True)
class Secret:
    host: str
    header: str
    value: str = field(repr=False)


def add_secrets(
    headers: dict[str, tuple[str, str]],
    secrets: Iterable[Secret],
    target: Target,
    *,
    allow_over_http: bool,
) -> None:
    """Set the secrets configured for the target's host in `headers` (lower-cased name ->
    (name, value)), replacing what the guest set; Refused if they would go over plain http."""
    matching = [
        secret for secret in secrets if entry_matches(secret.host, target.host, target.port)
    ]
    if (
        matching
        and target.scheme == "http"
        and not allow_over_http
        and not _is_loopback(target.host)
    ):
        raise Refused(f"a secret is configured for {target.host}: it is only sent over https")
    for secret in matching:
        headers[secret.header.lower()] = (secret.header, secret.value)


def scrubber(secrets: Iterable[Secret]) -> re.Pattern[str]:
    """What finds a tenant's secret values in text, longest forms first."""
    needles = set().union(*(_needles(secret.value) for secret in secrets))
    ordered = sorted(needles, key=lambda needle: (-len(needle), needle))
    return re.compile("|".join(re.escape(needle) for needle in ordered), re.IGNORECASE)


def scrubbed(pattern: re.Pattern[str] | None, answer: HttpResponse) -> HttpResponse:
    """The answer with every secret `pattern` finds redacted (status line aside)."""
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
