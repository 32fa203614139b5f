"""The API's OpenAPI document, exported to the repository's `schemas/openapi.json`.

Regenerate it with `python -m stepfleet.api.openapi` (or pass a file as the first argument);
tests/unit/test_openapi.py fails while the committed file drifts from the endpoints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

from stepfleet.api.app import create_app
from stepfleet.api.settings import ApiSettings
from stepfleet.workers.settings import Settings

REGENERATE_COMMAND: Final = "python -m stepfleet.api.openapi"
FILE_NAME: Final = "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The document the API serves at /api/v1/openapi.json (it needs no service to build)."""
    app = create_app(
        Settings(database_url="postgresql+psycopg://unused@127.0.0.1:1/unused"), ApiSettings()
    )
    return app.openapi()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def default_file() -> Path | None:
    """The repository's `schemas/openapi.json`, or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    return root / "schemas" / FILE_NAME if (root / "pyproject.toml").is_file() else None


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else default_file()
    if target is None:
        print("not in a stepfleet checkout: pass the output file", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(openapi_document()), encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
