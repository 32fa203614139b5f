"""Helpers shared by the commands: settings, async entry, clean errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

    from stepfleet.workers.settings import Settings

T = TypeVar("T")


def settings() -> Settings:
    """Read the settings from the environment (STEPFLEET_*)."""
    from stepfleet.workers.settings import Settings  # pydantic-settings: not for --help

    return Settings()


# What a terminal may act on instead of showing: C0 controls, DEL and C1 controls (ESC, CSI
# and OSC start escape sequences that recolour, retitle, move the cursor or write the
# clipboard), and the bidirectional controls that reorder what is shown. Tenants choose much of
# what the CLI prints (errors, outputs, names, headers), so it is all printed escaped.
_SPECIAL = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPED = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{
        ord(c): f"\\u{ord(c):04x}"
        for c in "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
        "\u2066\u2067\u2068\u2069"
    },
    **_SPECIAL,
}
_IN_LAYOUT = {c: e for c, e in _ESCAPED.items() if c not in (0x09, 0x0A)}


def shown(value: object) -> str:
    """A value as text a terminal shows as it is, on one line: control and bidirectional
    characters escaped (`\\x1b`, `\\u202e`), newlines and tabs too (`\\n`, `\\t`)."""
    return str(value).translate(_ESCAPED)


def say(text: str = "", *, err: bool = False) -> None:
    """Print human-readable output: control characters escaped, the newlines and tabs of its
    layout kept. Put values through `shown` so they cannot add lines of their own."""
    typer.echo(text.translate(_IN_LAYOUT), err=err)


def json_text(value: Any, **options: Any) -> str:
    """JSON a terminal shows as it is (ASCII only, DEL escaped too); it parses back to exactly
    `value`."""
    return json.dumps(value, ensure_ascii=True, **options).replace("\x7f", "\\u007f")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error for a person and exit non-zero."""
    say(f"error: {message}", err=True)
    raise typer.Exit(code)


_SERVICE_ERRORS = (
    ("stepfleet.store.errors", "StoreError", "PostgreSQL: "),
    ("stepfleet.broker.errors", "BrokerError", "RabbitMQ: "),
    ("stepfleet.sandbox.errors", "SandboxError", ""),
)


def _service_of(exc: Exception) -> str | None:
    """The prefix of a service failure's line, or None for another error. Only the rooms a
    command imported can have raised (commands import their libraries when they run)."""
    for module, name, prefix in _SERVICE_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return prefix
    return None


def run(
    coro: Coroutine[Any, Any, T], *, loop_factory: Callable[[], AbstractEventLoop] | None = None
) -> T:
    """Run a coroutine (on a loop `loop_factory` makes, if given), turning service failures
    into one clear line."""
    import asyncio

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coro)
    except Exception as exc:
        prefix = _service_of(exc)
        if prefix is None:
            raise
        fail(prefix + str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
