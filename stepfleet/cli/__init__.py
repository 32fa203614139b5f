"""The `stepfleet` command."""
