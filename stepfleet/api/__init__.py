"""The HTTP API and web console: `stepfleet api` serves both, with uvicorn."""

from __future__ import annotations

from stepfleet.api.app import create_app, serve
from stepfleet.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app", "serve"]
