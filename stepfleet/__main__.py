"""`python -m stepfleet` runs the command-line tool."""

from __future__ import annotations

from stepfleet.cli.main import main

main()
