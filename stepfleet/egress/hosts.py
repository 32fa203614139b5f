"""Allow-list entries and URLs: strict parsing, so a host is allowed only as written.

An allow-list entry is `host` (ports 80 and 443) or `host:port` (that port only), where host is
a DNS name, a dotted-quad IPv4 address or a bracketed IPv6 address, always lower-case. A URL is
allowed when its scheme is http or https, it has no userinfo, and its host, lower-cased, is
character for character an entry's host: no name resolution, no re-reading of `127.1`,
`2130706433`, `0x7f.0.0.1`, trailing dots or percent-encoding happens before the comparison.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = frozenset({80, 443})
"""The ports a bare `host` entry allows."""

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC_LOOKING = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


class HostError(ValueError):
    """An allow-list entry, or the host part of a URL, that is not acceptable."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points, once it passed the checks."""

    scheme: str
    host: str
    """As in an allow-list entry: lower-case, IPv6 in brackets."""
    port: int
    path: str
    """The request target: path and query, never empty."""

    @property
    def connect_host(self) -> str:
        """The host to connect to (IPv6 without brackets)."""
        return self.host[1:-1] if self.host.startswith("[") else self.host

    @property
    def authority(self) -> str:
        """host:port, for messages."""
        return f"{self.host}:{self.port}"


def _check_host(host: str) -> str:
    """Return `host` lower-cased if it is a DNS name, canonical IPv4 or bracketed IPv6."""
    host = host.lower()
    if host.startswith("["):
        if not host.endswith("]"):
            raise HostError(f"{host!r} is not a valid IPv6 literal")
        inner = host[1:-1]
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise HostError(f"{host!r} is not a valid IPv6 literal") from None
        if "%" in inner or address.compressed != inner:
            raise HostError(f"{host!r} is not a canonical IPv6 literal (write [{address}])")
        return host
    if not host or len(host) > 253:
        raise HostError("the host name is empty or too long")
    labels = host.split(".")
    if _NUMERIC_LOOKING.match(labels[-1]):
        # A name whose last label is numeric is read as an IPv4 address by resolvers, in
        # forms such as 127.1, 2130706433 or 0x7f.0.0.1: only the canonical form is accepted.
        try:
            address4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise HostError(
                f"{host!r} is neither a host name nor a dotted-quad IPv4 address"
            ) from None
        if str(address4) != host:
            raise HostError(f"{host!r} is not a canonical IPv4 address")
        return host
    if not all(_LABEL.match(label) for label in labels):
        raise HostError(f"{host!r} is not a valid host name")
    return host


def _split(entry: str) -> tuple[str, int | None]:
    """Split `host[:port]` (IPv6 in brackets) without interpreting anything."""
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise HostError(f"{entry!r} has an unclosed '['")
        host, rest = entry[: close + 1], entry[close + 1 :]
        if rest and not rest.startswith(":"):
            raise HostError(f"{entry!r} has text after the IPv6 literal")
        port_text = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise HostError(f"{entry!r}: write IPv6 addresses in brackets, like [::1]:8080")
    else:
        host, colon, after = entry.partition(":")
        port_text = after if colon else None
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or port_text.startswith("0"):
        raise HostError(f"{entry!r} has an invalid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HostError(f"{entry!r} has a port outside 1 to 65535")
    return host, port


def normalize_host_entry(entry: str) -> str:
    """The canonical form of an allow-list entry (or a secret's host); HostError if invalid.

    `API.Example.com` becomes `api.example.com`; a scheme, path, userinfo or any other decoration
    is refused, not stripped, so what is stored is what is matched.
    """
    text = entry.strip()
    if not text or not text.isascii() or any(c in text for c in "/@?#%\\ \t"):
        raise HostError(
            f"{entry!r} is not a host: write a name or address with an optional port, "
            "like api.example.com or 127.0.0.1:8080 (no scheme, path or userinfo)"
        )
    host, port = _split(text)
    host = _check_host(host)
    return host if port is None else f"{host}:{port}"


def entry_matches(entry: str, host: str, port: int) -> bool:
    """Tell whether the canonical `entry` allows `host` (canonical) on `port`."""
    return entry == f"{host}:{port}" or (entry == host and port in DEFAULT_PORTS)


def parse_url(url: str) -> Target:
    """Check a guest's URL and say where it points; HostError says what is wrong."""
    if not url.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise HostError("the URL must be ASCII without spaces or control characters")
    if "\\" in url:
        raise HostError("the URL must not contain backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise HostError(f"the URL is not valid ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise HostError("only http and https URLs are allowed")
    netloc = parts.netloc
    if "@" in netloc:
        raise HostError("URLs with userinfo (user@host) are not allowed")
    if not netloc:
        raise HostError("the URL has no host")
    if "%" in netloc:
        raise HostError("percent-encoded hosts are not allowed")
    host, port = _split(netloc)
    host = _check_host(host)
    if port is None:
        port = 443 if scheme == "https" else 80
    path = parts.path or "/"
    if not path.startswith("/"):
        raise HostError("the URL path must start with '/'")
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port, path)
