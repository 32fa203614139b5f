"""The `step_begin` config: strict JSON, never silently clamped (docs/guest-abi.md)."""

from __future__ import annotations

from typing import Any

from stepfleet.sandbox.guest_json import parse_guest_json
from stepfleet.schemas import DEFAULT_STEP_CONFIG, Backoff, StepConfig
from stepfleet.schemas.instance import MAX_RETRY_LIMIT


def parse_step_config(text: str, *, max_ms: int) -> StepConfig:
    """Parse a step's config; "" means every default.

    Raises:
        ValueError: the text is not JSON (or nests too deeply), has unknown fields, or a
            value out of range.
    """
    if not text:
        return DEFAULT_STEP_CONFIG
    raw = parse_guest_json(text)
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object")
    _only(raw, {"retries", "timeout_ms"}, "")
    retries = raw.get("retries", {})
    if not isinstance(retries, dict):
        raise ValueError("retries must be an object")
    _only(retries, {"limit", "delay_ms", "backoff"}, "retries.")
    backoff = retries.get("backoff", DEFAULT_STEP_CONFIG.backoff.value)
    try:
        kind = Backoff(backoff)
    except ValueError:
        raise ValueError(
            f"retries.backoff must be constant, linear or exponential, not {backoff!r}"
        ) from None
    return StepConfig(
        retry_limit=_int(
            retries, "limit", DEFAULT_STEP_CONFIG.retry_limit, 0, MAX_RETRY_LIMIT, "retries."
        ),
        retry_delay_ms=_int(
            retries, "delay_ms", DEFAULT_STEP_CONFIG.retry_delay_ms, 0, max_ms, "retries."
        ),
        backoff=kind,
        timeout_ms=_int(raw, "timeout_ms", DEFAULT_STEP_CONFIG.timeout_ms, 1, max_ms),
    )


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValueError(f"unknown field {where}{unknown[0]}")


def _int(obj: dict[str, Any], key: str, default: int, low: int, high: int, where: str = "") -> int:
    if key not in obj:
        # A fleet whose sleep limit is below a default applies its limit instead.
        return min(default, high)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}{key} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"{where}{key} is {value}, allowed {low} to {high}")
    return value
