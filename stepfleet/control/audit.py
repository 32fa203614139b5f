"""Who an operator is, for the audit log."""

from __future__ import annotations

import getpass
import os
import socket


def operator_name() -> str:
    """STEPFLEET_OPERATOR when set (e.g. by a wrapper that authenticated the person), else the
    local user and host the command runs as."""
    named = os.environ.get("STEPFLEET_OPERATOR", "").strip()
    if named:
        return named
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    return f"{user}@{socket.gethostname()}"
