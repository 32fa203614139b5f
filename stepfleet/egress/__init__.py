"""The egress gateway: guests' HTTP calls, each tenant's allow list, secrets sealed at rest.

It may import only stepfleet.schemas, the standard library, `cryptography` and `aiohttp` (with
its `yarl`); the sandbox reaches it through its `Egress` port, and the worker builds and
configures it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.egress.gateway import EgressGateway
    from stepfleet.egress.hosts import HostError, normalize_host_entry, parse_url
    from stepfleet.egress.request_checks import (
        METHODS,
        RESERVED_HEADERS,
        check_secret_header,
        check_secret_value,
        is_header_name,
    )
    from stepfleet.egress.sealing import (
        SealedSecret,
        SealError,
        check_key,
        new_key,
        open_sealed,
        open_secret,
        open_secrets,
        seal,
        seal_secret,
    )

__all__ = [
    "METHODS",
    "RESERVED_HEADERS",
    "EgressGateway",
    "HostError",
    "SealError",
    "SealedSecret",
    "check_key",
    "check_secret_header",
    "check_secret_value",
    "is_header_name",
    "new_key",
    "normalize_host_entry",
    "open_sealed",
    "open_secret",
    "open_secrets",
    "parse_url",
    "seal",
    "seal_secret",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "EgressGateway": "stepfleet.egress.gateway",
        "HostError": "stepfleet.egress.hosts",
        "normalize_host_entry": "stepfleet.egress.hosts",
        "parse_url": "stepfleet.egress.hosts",
        "METHODS": "stepfleet.egress.request_checks",
        "RESERVED_HEADERS": "stepfleet.egress.request_checks",
        "check_secret_header": "stepfleet.egress.request_checks",
        "check_secret_value": "stepfleet.egress.request_checks",
        "is_header_name": "stepfleet.egress.request_checks",
        "SealedSecret": "stepfleet.egress.sealing",
        "SealError": "stepfleet.egress.sealing",
        "check_key": "stepfleet.egress.sealing",
        "new_key": "stepfleet.egress.sealing",
        "open_sealed": "stepfleet.egress.sealing",
        "open_secret": "stepfleet.egress.sealing",
        "open_secrets": "stepfleet.egress.sealing",
        "seal": "stepfleet.egress.sealing",
        "seal_secret": "stepfleet.egress.sealing",
    },
)
