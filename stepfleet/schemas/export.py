"""JSON Schema documents of the wire protocol, generated from the message models.

The files in the repository's top-level `schemas/` folder are this module's output; regenerate
them with `python -m stepfleet.schemas.export` (or pass a folder as the first argument).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

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


class _HeaderSchema(GenerateJsonSchema):
    """JSON Schema of `Headers` as a header table: a header is a string, present or absent
    (never null, no default), properties stay in the model's order, and no titles."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def enum_schema(self, schema: core_schema.EnumSchema) -> JsonSchemaValue:
        return {"type": "string", "enum": [member.value for member in schema["members"]]}

    def sort(self, value: JsonSchemaValue, parent_key: str | None = None) -> JsonSchemaValue:
        return value

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        """Put each definition (the kinds' enum) in place of its `$ref`."""
        document = super().generate(schema, mode)
        definitions = document.pop("$defs", {})
        for name, field in document["properties"].items():
            if "$ref" in field:
                target = definitions[field.pop("$ref").rsplit("/", 1)[1]]
                target.pop("title", None)
                document["properties"][name] = target | field
        return document


def headers_schema() -> dict[str, Any]:
    """Return the schema document of the AMQP headers every message carries."""
    return _document(
        "headers",
        f"stepfleet message headers, version {SCHEMA_VERSION}",
        "AMQP headers (the `headers` table of the basic properties) of every stepfleet "
        "message, as short strings. Other headers are allowed and ignored.",
        Headers.model_json_schema(by_alias=True, schema_generator=_HeaderSchema),
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
