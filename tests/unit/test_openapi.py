"""The committed OpenAPI document is what the API's endpoints generate today."""

from __future__ import annotations

import json
from pathlib import Path

from stepfleet.api.openapi import FILE_NAME, REGENERATE_COMMAND, main, openapi_document, render

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_openapi_matches_the_endpoints():
    committed = json.loads((SCHEMAS / FILE_NAME).read_text(encoding="utf-8"))
    hint = f"schemas/{FILE_NAME} is out of date with stepfleet/api: run `{REGENERATE_COMMAND}`"
    assert committed == openapi_document(), hint


def test_the_document_covers_every_endpoint_and_its_errors():
    document = openapi_document()
    paths = document["paths"]
    for path in (
        "/healthz",
        "/readyz",
        "/api/v1/instances",
        "/api/v1/instances/{tenant}/{instance_id}",
        "/api/v1/instances/{tenant}/{instance_id}/pause",
        "/api/v1/instances/{tenant}/{instance_id}/resume",
        "/api/v1/instances/{tenant}/{instance_id}/terminate",
        "/api/v1/instances/{tenant}/{instance_id}/restart",
        "/api/v1/instances/{tenant}/{instance_id}/retry",
        "/api/v1/instances/retry-failed",
        "/api/v1/dead-letters",
        "/api/v1/dead-letters/{letter_id}",
        "/api/v1/dead-letters/{letter_id}/replay",
        "/api/v1/dead-letters/replay",
        "/api/v1/dead-letters/purge",
        "/api/v1/dead-letters/export",
        "/api/v1/tenants",
        "/api/v1/tenants/{name}",
        "/api/v1/tenants/{name}/limits",
        "/api/v1/tenants/{name}/hosts",
        "/api/v1/tokens",
        "/api/v1/tokens/{name}",
        "/api/v1/audit",
        "/api/v1/overview",
    ):
        assert path in paths, path
    assert not any(p.startswith(("/login", "/dead-letters", "/static")) for p in paths)
    listing = paths["/api/v1/instances"]["get"]
    assert {"401", "403", "422"} <= set(listing["responses"])
    assert listing["security"] == [{"HTTPBearer": []}]


def test_main_writes_the_document(tmp_path: Path):
    assert main([str(tmp_path / "o.json")]) == 0
    assert (tmp_path / "o.json").read_text(encoding="utf-8") == render(openapi_document())
