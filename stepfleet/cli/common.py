"""Helpers shared by the commands: settings, async entry, clean errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer

from stepfleet.broker import BrokerError
from stepfleet.sandbox import SandboxError
from stepfleet.store import StoreError
from stepfleet.workers.settings import Settings

T = TypeVar("T")


def settings() -> Settings:
    """Read the settings from the environment (STEPFLEET_*)."""
    return Settings()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error for a person and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning service failures into one clear line."""
    try:
        return asyncio.run(coro)
    except StoreError as exc:
        fail(f"PostgreSQL: {exc}")
    except BrokerError as exc:
        fail(f"RabbitMQ: {exc}")
    except SandboxError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
