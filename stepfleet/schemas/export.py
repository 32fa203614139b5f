"""JSON Schema documents of the wire protocol, generated from the message models.

The files in the repository's top-level `schemas/` folder are this module's output; regenerate
them with `python -m stepfleet.schemas.export` (or pass a folder as the first argument).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

from stepfleet.schemas.identifiers import DIGEST_PATTERN, INSTANCE_ID_PATTERN, TENANT_PATTERN
from stepfleet.schemas.messages import BODY_MODELS, SCHEMA_VERSION, Headers, MessageKind

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX: Final = "urn:stepfleet:schema:"
REGENERATE_COMMAND: Final = "python -m stepfleet.schemas.export"

_SENDERS: Final[dict[MessageKind, str]] = {
    MessageKind.CREATE: "Published by producers to the ingress exchange.",
    MessageKind.EVENT: (
        "Published by producers to the ingress exchange; delivered to the instance's wait "
        "for its type, or stored until one; idempotent by event_id."
    ),
    MessageKind.STEP: "Internal: published by workers to the internal exchange only.",
    MessageKind.WAKE: (
        "Internal: published by workers when a sleep, a retry backoff or an event "
        "wait's timeout is due."
    ),
}


def schema_file_name(name: str) -> str:
    """Return the file name of a schema document, e.g. `create.v1.schema.json`."""
    return f"{name}.v{SCHEMA_VERSION}.schema.json"


def _document(name: str, title: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Put the identifying keywords first, then the schema itself."""
    identity = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": ID_PREFIX + schema_file_name(name),
        "title": title,
        "description": description,
    }
    rest = {key: value for key, value in schema.items() if key not in identity}
    return identity | rest


def body_schema(kind: MessageKind) -> dict[str, Any]:
    """Return the schema document of one message kind's JSON body."""
    model = BODY_MODELS[kind]
    schema = model.model_json_schema()
    description = (
        f"The JSON body of `{kind.value}` messages (x-kind: {kind.value}, schema version "
        f"{SCHEMA_VERSION}): {schema.get('description', model.__doc__ or '').strip()} "
        f"{_SENDERS[kind]} Sent as UTF-8 JSON; unknown fields are refused."
    )
    return _document(
        kind.value,
        f"stepfleet {kind.value} message body, version {SCHEMA_VERSION}",
        description,
        schema,
    )


def headers_schema() -> dict[str, Any]:
    """Return the schema document of the AMQP headers every message carries."""

    def text(description: str, **keywords: Any) -> dict[str, Any]:
        return {"type": "string", "description": description, **keywords}

    kinds = [kind.value for kind in MessageKind]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            Headers.TENANT: text(
                "The tenant the instance belongs to; also the first word of the routing key.",
                pattern=TENANT_PATTERN,
            ),
            Headers.INSTANCE: text(
                "The instance id, unique within the tenant and chosen by the producer.",
                pattern=INSTANCE_ID_PATTERN,
            ),
            Headers.MODULE: text(
                "Digest of the module to run: `sha256:` and 64 lower-case hex digits. "
                "Required on create; optional on other kinds, checked when present.",
                pattern=DIGEST_PATTERN,
            ),
            Headers.KIND: text(
                "Which message this is; also the last word of the routing key. "
                "Producers send create and event; step and wake are internal.",
                enum=kinds,
            ),
            Headers.SCHEMA_VERSION: text("Version of the body schema.", const=str(SCHEMA_VERSION)),
            Headers.TRACEPARENT: text(
                "Optional W3C trace context, copied onto every message the instance causes."
            ),
        },
        "required": [Headers.TENANT, Headers.INSTANCE, Headers.KIND, Headers.SCHEMA_VERSION],
        "if": {
            "properties": {Headers.KIND: {"const": MessageKind.CREATE.value}},
            "required": [Headers.KIND],
        },
        "then": {"required": [Headers.MODULE]},
        "additionalProperties": True,
    }
    return _document(
        "headers",
        f"stepfleet message headers, version {SCHEMA_VERSION}",
        "AMQP headers (the `headers` table of the basic properties) of every stepfleet "
        "message, as short strings. Other headers are allowed and ignored.",
        schema,
    )


def json_schemas() -> dict[str, dict[str, Any]]:
    """Return every schema document, keyed by file name (`create.v1.schema.json`, ...)."""
    documents = {schema_file_name(kind.value): body_schema(kind) for kind in BODY_MODELS}
    documents[schema_file_name("headers")] = headers_schema()
    return documents


def render(document: dict[str, Any]) -> str:
    """Return the text a schema document is stored as."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema document into `folder` (created if needed); return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, document in json_schemas().items():
        path = folder / name
        path.write_text(render(document), encoding="utf-8")
        written.append(path)
    return written


def default_folder() -> Path | None:
    """Return the repository's top-level `schemas/` folder, or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    return root / "schemas" if (root / "pyproject.toml").is_file() else None


def main(argv: list[str]) -> int:
    """Write the schemas to argv[0], or to the repository's `schemas/` folder."""
    folder = Path(argv[0]) if argv else default_folder()
    if folder is None:
        print("not in a stepfleet checkout: pass the output folder", file=sys.stderr)
        return 2
    for path in write_schemas(folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
