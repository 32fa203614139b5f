"""What a guest's call may be: methods, the tenant's allow list, header names and values; and
which headers a secret may be sent in."""

from __future__ import annotations

import re
from collections.abc import Iterable

from stepfleet.egress.hosts import HostError, entry_matches, parse_url
from stepfleet.egress.secrets import Secret, add_secrets
from stepfleet.egress.transport import Plan, Refused
from stepfleet.schemas import HttpRequest

__all__ = [
    "METHODS",
    "RESERVED_HEADERS",
    "check_secret_header",
    "check_secret_value",
    "is_header_name",
    "plan_call",
]

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


def plan_call(
    tenant: str,
    request: HttpRequest,
    allowed: frozenset[str],
    secrets: Iterable[Secret],
    *,
    allow_secrets_over_http: bool,
    user_agent: str,
) -> Plan:
    """The call `request` makes for `tenant` (whose allow list is `allowed`), secrets added;
    Refused, saying why, if it may not be made."""
    method = request.method.upper()
    if method not in METHODS:
        raise Refused(f"method {request.method!r} is not allowed ({', '.join(sorted(METHODS))})")
    try:
        target = parse_url(request.url)
    except HostError as exc:
        raise Refused(f"URL refused: {exc}") from None
    if not any(entry_matches(entry, target.host, target.port) for entry in allowed):
        raise Refused(
            f"{target.host} port {target.port} is not on the egress allow list of tenant {tenant!r}"
        )
    headers: dict[str, tuple[str, str]] = {}
    for name, value in request.headers.items():
        if not is_header_name(name):
            raise Refused(f"header name {name!r} is not valid")
        if name.lower() in RESERVED_HEADERS:
            raise Refused(f"header {name!r} may not be set by a guest")
        if not _header_value_ok(value):
            raise Refused(f"header {name!r} has a value with line breaks, NUL or non-Latin-1 text")
        headers[name.lower()] = (name, value)
    add_secrets(headers, secrets, target, allow_over_http=allow_secrets_over_http)
    headers.setdefault("user-agent", ("User-Agent", user_agent))
    try:
        body = request.body.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("the request body is not valid Unicode text") from None
    if not body and method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        payload: bytes | None = None
    else:
        payload = body
    return Plan(method, target, dict(headers.values()), payload)
