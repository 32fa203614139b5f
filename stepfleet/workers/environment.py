"""Single settings read from the environment without pydantic, for commands that must start
quickly (`stepfleet status`); `Settings` takes its names and defaults from here."""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_PREFIX = "STEPFLEET_"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/stepfleet"


def database_url(environ: Mapping[str, str] = os.environ) -> str:
    """STEPFLEET_DATABASE_URL as `Settings` reads it: the name in any case (when several
    spellings are set, the last one in the environment wins), else the default."""
    wanted = f"{ENV_PREFIX}database_url".lower()
    found = DEFAULT_DATABASE_URL
    for name, value in environ.items():
        if name.lower() == wanted:
            found = value
    return found
