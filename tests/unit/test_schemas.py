"""The wire protocol's written forms agree: models, committed JSON Schemas and docs/protocol.md."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stepfleet.broker import Topology
from stepfleet.client import CreateRequest, create_message
from stepfleet.cycle.messages import step_message, wake_message
from stepfleet.engine import InstanceState, Reject, admit, check_size
from stepfleet.schemas import (
    BODY_MODELS,
    CreateBody,
    DeadReason,
    Envelope,
    EventBody,
    Headers,
    InstanceKey,
    InstanceStatus,
    InvalidMessage,
    MessageKind,
    StepBody,
    parse_envelope,
)
from stepfleet.schemas.export import REGENERATE_COMMAND, json_schemas, main, write_schemas
from stepfleet.schemas.messages import refusal
from stepfleet.schemas.trace_context import read_traceparent
from stepfleet.store import DueTimer
from stepfleet.workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
PROTOCOL = ROOT / "docs" / "protocol.md"

MODULE = "sha256:" + "ab" * 32
OTHER_MODULE = "sha256:" + "cd" * 32
LIMIT = 1000
CREATE_HEADERS = {
    Headers.TENANT: "acme",
    Headers.INSTANCE: "order-1",
    Headers.MODULE: MODULE,
    Headers.KIND: "create",
    Headers.SCHEMA_VERSION: "1",
}
CREATE_BODY = b'{"version":1,"params":{"order_id":"A-1"}}'

# `<!-- example: KIND -->` on the line before a ```json block says what the block is.
_EXAMPLE = re.compile(r"<!-- example: ([a-z]+) -->\n```json\n(.*?)```", re.DOTALL)
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _doc() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


def _examples() -> list[tuple[str, Any]]:
    return [(kind, json.loads(text)) for kind, text in _EXAMPLE.findall(_doc())]


def _documented_reasons() -> set[str]:
    """The codes in the first column of the doc's `x-dead-reason` table."""
    lines = _doc().splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("| `x-dead-reason` | meaning |")
    )
    codes: set[str] = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        codes.add(line.split("|")[1].strip().strip("`"))
    return codes


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in CREATE_HEADERS.items() if k != name}


def _with(**changes: Any) -> dict[str, Any]:
    return CREATE_HEADERS | {k.replace("_", "-"): v for k, v in changes.items()}


REFUSALS = [
    pytest.param(_without(Headers.KIND), CREATE_BODY, DeadReason.MISSING_HEADER, id="no-kind"),
    pytest.param(
        _without(Headers.SCHEMA_VERSION), CREATE_BODY, DeadReason.MISSING_HEADER, id="no-version"
    ),
    pytest.param(_without(Headers.TENANT), CREATE_BODY, DeadReason.MISSING_HEADER, id="no-tenant"),
    pytest.param(
        _without(Headers.INSTANCE), CREATE_BODY, DeadReason.MISSING_HEADER, id="no-instance"
    ),
    pytest.param(
        _without(Headers.MODULE), CREATE_BODY, DeadReason.MISSING_HEADER, id="create-no-module"
    ),
    pytest.param(_with(x_tenant=""), CREATE_BODY, DeadReason.MISSING_HEADER, id="empty-tenant"),
    pytest.param(
        _with(x_module=""), CREATE_BODY, DeadReason.MISSING_HEADER, id="create-empty-module"
    ),
    pytest.param(_with(x_kind="start"), CREATE_BODY, DeadReason.BAD_HEADER, id="unknown-kind"),
    pytest.param(
        _with(x_tenant="Acme"), CREATE_BODY, DeadReason.BAD_HEADER, id="upper-case-tenant"
    ),
    pytest.param(_with(x_tenant="acme.eu"), CREATE_BODY, DeadReason.BAD_HEADER, id="dotted-tenant"),
    pytest.param(
        _with(x_instance_id="-1"), CREATE_BODY, DeadReason.BAD_HEADER, id="bad-instance-id"
    ),
    pytest.param(
        _with(x_instance_id="a" * 129), CREATE_BODY, DeadReason.BAD_HEADER, id="long-instance"
    ),
    pytest.param(_with(x_module="sha256:ABC"), CREATE_BODY, DeadReason.BAD_HEADER, id="bad-digest"),
    pytest.param(
        _with(x_module=MODULE.upper()), CREATE_BODY, DeadReason.BAD_HEADER, id="upper-digest"
    ),
    pytest.param(_with(x_tenant=["acme"]), CREATE_BODY, DeadReason.BAD_HEADER, id="array-value"),
    pytest.param(_with(x_tenant=True), CREATE_BODY, DeadReason.BAD_HEADER, id="boolean-value"),
    pytest.param(_with(x_tenant=b"\xff"), CREATE_BODY, DeadReason.BAD_HEADER, id="not-utf8"),
    pytest.param(
        _with(x_schema_version="2"), CREATE_BODY, DeadReason.UNSUPPORTED_VERSION, id="version-2"
    ),
    pytest.param(
        _with(x_schema_version="1.0"), CREATE_BODY, DeadReason.UNSUPPORTED_VERSION, id="version-1.0"
    ),
    pytest.param(CREATE_HEADERS, b" " * (LIMIT + 1), DeadReason.TOO_LARGE, id=DeadReason.TOO_LARGE),
    pytest.param(CREATE_HEADERS, b"{not json", DeadReason.BAD_BODY, id="not-json"),
    pytest.param(CREATE_HEADERS, b"[1]", DeadReason.BAD_BODY, id="not-an-object"),
    pytest.param(
        CREATE_HEADERS, b'{"version":1,"parms":{}}', DeadReason.BAD_BODY, id="unknown-field"
    ),
    pytest.param(CREATE_HEADERS, b'{"version":2}', DeadReason.BAD_BODY, id="body-version-2"),
    pytest.param(
        _with(x_kind="step"), b'{"version":1}', DeadReason.BAD_BODY, id="step-no-position"
    ),
    pytest.param(
        _with(x_kind="step"), b'{"position":-1}', DeadReason.BAD_BODY, id="negative-position"
    ),
    pytest.param(_with(x_kind="event"), b'{"type":"paid"}', DeadReason.BAD_BODY, id="event-no-id"),
    pytest.param(
        _with(x_kind="event"),
        b'{"event_id":"","type":"x"}',
        DeadReason.BAD_BODY,
        id="event-empty-id",
    ),
    pytest.param(
        _with(x_kind="event"),
        b'{"event_id":"e","type":"' + b"t" * 257 + b'"}',
        DeadReason.BAD_BODY,
        id="event-type-too-long",
    ),
    pytest.param(
        _with(x_kind="event"),
        b'{"event_id":"e\\u0000","type":"paid"}',
        DeadReason.BAD_BODY,
        id="event-id-with-nul",
    ),
    pytest.param(
        _with(x_kind="event"),
        b'{"event_id":"e","type":"\\u001b]8;;http://x\\u0007paid"}',
        DeadReason.BAD_BODY,
        id="event-type-with-escape",
    ),
    pytest.param(_with(CC=["other.create"]), CREATE_BODY, DeadReason.BAD_HEADER, id="cc-header"),
    pytest.param(_with(BCC=["other.create"]), CREATE_BODY, DeadReason.BAD_HEADER, id="bcc-header"),
    pytest.param(
        _with(x_kind="create"),
        b'{"params":{},"retention_seconds":-1}',
        DeadReason.BAD_BODY,
        id="negative-retention",
    ),
]


def _admission_reasons() -> set[str]:
    """Run admit() into each of its refusals and return the reason codes it gave."""
    key = InstanceKey("acme", "order-1")
    running = InstanceState(key, MODULE, InstanceStatus.RUNNING, 2)

    def envelope(kind: MessageKind, body: Any, module: str | None = MODULE) -> Envelope:
        return Envelope(kind, key.tenant, key.instance_id, module, body)

    finished = InstanceState(key, MODULE, InstanceStatus.COMPLETE, 2)
    now = datetime.now(UTC)
    cases = [
        admit(envelope(MessageKind.STEP, StepBody(position=0)), None, created_now=False, now=now),
        admit(
            envelope(MessageKind.CREATE, CreateBody(), OTHER_MODULE),
            running,
            created_now=False,
            now=now,
        ),
        admit(
            envelope(MessageKind.STEP, StepBody(position=3)), running, created_now=False, now=now
        ),
        admit(
            envelope(MessageKind.EVENT, EventBody(event_id="e1", type="paid")),
            finished,
            created_now=False,
            now=now,
        ),
        check_size("params", "{}", 1),
    ]
    assert all(isinstance(case, Reject) for case in cases)
    return {case.reason for case in cases if isinstance(case, Reject)}


def test_committed_schemas_match_the_models():
    """The files in schemas/ are exactly what the models generate today."""
    expected = json_schemas()
    committed = {path.name for path in SCHEMAS.glob("*.schema.json")}
    hint = f"schemas/ is out of date with stepfleet/schemas: run `{REGENERATE_COMMAND}`"
    assert committed == set(expected), hint
    for name, document in expected.items():
        assert json.loads((SCHEMAS / name).read_text(encoding="utf-8")) == document, (
            f"{name}: {hint}"
        )


def test_schema_documents_identify_themselves():
    """Every schema document carries its dialect, a unique $id, a title and a description."""
    documents = json_schemas()
    assert {f"{kind.value}.v1.schema.json" for kind in BODY_MODELS} < set(documents)
    assert "headers.v1.schema.json" in documents
    ids = [document["$id"] for document in documents.values()]
    assert len(set(ids)) == len(ids)
    for name, document in documents.items():
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert document["$id"].endswith(name)
        assert document["title"]
        assert document["description"]


def test_write_schemas_and_main_write_every_document(tmp_path: Path):
    """write_schemas and the command-line entry write one file per document, as JSON."""
    written = write_schemas(tmp_path / "a")
    assert {path.name for path in written} == set(json_schemas())
    assert main([str(tmp_path / "b")]) == 0
    for path in written:
        again = tmp_path / "b" / path.name
        assert again.read_bytes() == path.read_bytes()
        assert json.loads(path.read_text(encoding="utf-8")) == json_schemas()[path.name]


def test_every_body_json_block_in_the_doc_is_a_marked_example():
    """Each ```json block of protocol.md with a "version" key is marked with its message kind."""
    bodies = [
        block
        for block in _JSON_BLOCK.findall(_doc())
        if isinstance(loaded := json.loads(block), dict) and "version" in loaded
    ]
    marked = [json.loads(text) for kind, text in _EXAMPLE.findall(_doc()) if kind != "message"]
    assert len(bodies) == len(marked), "mark every body example with <!-- example: KIND -->"
    assert {kind for kind, _ in _examples()} == {kind.value for kind in BODY_MODELS} | {"message"}


@pytest.mark.parametrize(
    ("kind", "example"),
    [pytest.param(kind, example, id=kind) for kind, example in _examples() if kind != "message"],
)
def test_doc_body_examples_validate(kind: str, example: Any):
    """A body example from protocol.md validates against the model of its kind."""
    BODY_MODELS[MessageKind(kind)].model_validate_json(json.dumps(example))


def test_doc_message_example_is_a_valid_create():
    """The worked example's raw message routes and parses exactly as the doc says."""
    [message] = [example for kind, example in _examples() if kind == "message"]
    properties, headers = message["properties"], message["properties"]["headers"]
    envelope = parse_envelope(
        headers,
        json.dumps(message["body"]).encode(),
        max_body_bytes=Settings.model_fields["max_message_bytes"].default,
    )
    assert envelope.kind is MessageKind.CREATE
    assert message["exchange"] == Topology().ingress_exchange
    assert message["routing_key"] == f"{envelope.tenant}.{envelope.kind.value}"
    assert message["mandatory"] is True
    assert properties["delivery_mode"] == 2
    assert properties["content_type"] == "application/json"
    assert properties["message_id"] == f"{envelope.tenant}/{envelope.instance_id}/create"


def test_doc_names_the_topology_headers_and_limits():
    """protocol.md names every broker object, queue argument, header and the size limit."""
    doc = _doc()
    topology = Topology()
    names = [
        topology.ingress_exchange,
        topology.internal_exchange,
        topology.dead_letter_exchange,
        topology.lanes_exchange,
        topology.work_queues[0],
        topology.work_queues[-1],
        topology.dead_letter_queue,
    ]
    for name in names:
        assert f"`{name}`" in doc, name
    for argument, value in topology.work_queue_arguments().items():
        if value == topology.dead_letter_exchange:
            value = f"{topology.prefix}.dead-letter"
        assert f"| `{argument}` | `{value}`" in doc, argument
    for name in (
        Headers.TENANT,
        Headers.INSTANCE,
        Headers.MODULE,
        Headers.KIND,
        Headers.SCHEMA_VERSION,
        Headers.TRACEPARENT,
        Headers.DEAD_REASON,
        Headers.DEAD_DETAIL,
        "x-original-routing-key",
        "x-original-user-id",
    ):
        assert f"| `{name}` |" in doc, name
    assert f"{Settings.model_fields['max_message_bytes'].default:,}" in doc


@pytest.mark.parametrize(("headers", "body", "reason"), REFUSALS)
def test_parse_envelope_refusals_carry_documented_reasons(
    headers: dict[str, Any], body: bytes, reason: DeadReason
):
    """parse_envelope refuses a broken message with the reason code protocol.md documents."""
    with pytest.raises(InvalidMessage) as refused:
        parse_envelope(headers, body, max_body_bytes=LIMIT)
    assert refused.value.reason is reason
    assert reason in _documented_reasons()


def test_reason_table_lists_exactly_the_dead_reasons():
    """The doc's reason table documents every DeadReason, and no other code."""
    assert _documented_reasons() == {reason.value for reason in DeadReason}


def test_every_dead_reason_is_given_somewhere():
    """The refusals above give DeadReason members, and every member is used by the package,
    so the enum (and with it the doc's table) lists no code stepfleet never gives."""
    produced = {param.values[2] for param in REFUSALS} | _admission_reasons()
    assert all(isinstance(reason, DeadReason) for reason in produced)
    sources = [
        path.read_text(encoding="utf-8")
        for path in (ROOT / "stepfleet").rglob("*.py")
        if path != ROOT / "stepfleet" / "schemas" / "reasons.py"
    ]
    unused = {r for r in DeadReason if not any(f"DeadReason.{r.name}" in s for s in sources)}
    assert not unused, f"members no code gives: {sorted(unused)}"


def test_parse_envelope_accepts_bytes_and_integer_header_values():
    """Header values may arrive as UTF-8 bytes, and the schema version as an integer."""
    headers = {k: v.encode() for k, v in CREATE_HEADERS.items()} | {Headers.SCHEMA_VERSION: 1}
    envelope = parse_envelope(headers, CREATE_BODY, max_body_bytes=LIMIT)
    assert envelope.tenant == "acme"
    assert envelope.body == CreateBody(params={"order_id": "A-1"})


def test_create_body_defaults_match_the_doc():
    """A create body may omit version and params: they default to 1 and {}."""
    envelope = parse_envelope(CREATE_HEADERS, b"{}", max_body_bytes=LIMIT)
    assert envelope.body == CreateBody(version=1, params={})


@pytest.mark.parametrize(
    ("headers", "body", "detail"),
    [
        pytest.param(_without(Headers.KIND), CREATE_BODY, "header x-kind is required", id="kind"),
        pytest.param(_with(x_kind="start"), b"{}", "unknown message kind 'start'", id="unknown"),
        pytest.param(
            _with(x_schema_version="2", x_tenant="Acme"),
            CREATE_BODY,
            "schema version '2' is not 1",
            id="version-before-tenant",
        ),
        pytest.param(
            _with(x_tenant="A" * 100),
            CREATE_BODY,
            f"x-tenant {'A' * 80!r} is not a tenant name",
            id="tenant",
        ),
        pytest.param(
            _with(x_instance_id="-" * 200),
            CREATE_BODY,
            f"x-instance-id {'-' * 140!r} is not an instance id",
            id="instance",
        ),
        pytest.param(
            _without(Headers.MODULE), CREATE_BODY, "header x-module is required on create", id="m"
        ),
        pytest.param(
            _with(x_module=""), CREATE_BODY, "header x-module is required on create", id="module"
        ),
        pytest.param(_with(x_tenant=b"\xff"), CREATE_BODY, "header x-tenant is not UTF-8", id="u"),
        pytest.param(_with(x_tenant=None), CREATE_BODY, "header x-tenant is required", id="none"),
        pytest.param(
            _with(x_tenant=1.5), CREATE_BODY, "header x-tenant must be a string", id="float"
        ),
        pytest.param(
            _with(CC=[], x_kind="start"),
            CREATE_BODY,
            "header CC (sender-selected distribution) is not allowed",
            id="cc-first",
        ),
        pytest.param(
            _with(traceparent=[1]), b"[1]", "create body: body: Input should be an object", id="t1"
        ),
        pytest.param(
            {k.removeprefix("x-").replace("-", "_"): v for k, v in CREATE_HEADERS.items()},
            CREATE_BODY,
            "header x-kind is required",
            id="field-names-are-not-headers",
        ),
    ],
)
def test_parse_envelope_refusal_details(headers: dict[str, Any], body: bytes, detail: str):
    """The detail of a refusal names the first broken header, in the order a worker checks
    them: sender-selected headers, kind, version, tenant, instance, module, then the body (a
    traceparent is never refused)."""
    with pytest.raises(InvalidMessage) as refused:
        parse_envelope(headers, body, max_body_bytes=LIMIT)
    assert refused.value.detail == detail


def test_headers_model_builds_what_parse_envelope_reads():
    """Headers.table gives the header table in its published order, and parse_envelope reads
    it back; an empty traceparent and an absent module are left out."""
    wire = Headers.table(MessageKind.CREATE, "acme", "order-1", MODULE, TRACEPARENT)
    assert list(wire.items()) == [*CREATE_HEADERS.items(), (Headers.TRACEPARENT, TRACEPARENT)]
    envelope = parse_envelope(wire, CREATE_BODY, max_body_bytes=LIMIT)
    assert (envelope.tenant, envelope.instance_id, envelope.module, envelope.traceparent) == (
        "acme",
        "order-1",
        MODULE,
        TRACEPARENT,
    )
    event = Headers.table(MessageKind.EVENT, "acme", "order-1", traceparent="")
    assert list(event) == [Headers.TENANT, Headers.INSTANCE, Headers.KIND, Headers.SCHEMA_VERSION]


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        pytest.param(("Acme", "order-1", MODULE), "x-tenant 'Acme' is not a tenant name", id="t"),
        pytest.param(("acme", "-1", MODULE), "x-instance-id '-1' is not an instance id", id="i"),
        pytest.param(("acme", "x", "sha256:AB"), "x-module 'sha256:AB' is not a digest", id="m"),
    ],
)
def test_producer_refuses_headers_with_the_dead_letter_detail(
    fields: tuple[str, str, str], detail: str
):
    """The producer checks its headers with the same model, and says what a worker would."""
    tenant, instance_id, module = fields
    with pytest.raises(ValueError, match=f"^{re.escape(detail)}$"):
        create_message(Topology(), CreateRequest(tenant, module, instance_id=instance_id))


def test_step_and_wake_messages_carry_headers_parse_envelope_reads():
    """The step and wake builders' headers are the model's table, and they parse back."""
    key = InstanceKey("acme", "order-1")
    row, step = step_message(Topology(), key, MODULE, 3, 0, TRACEPARENT)
    assert json.loads(row.headers) == step.headers
    assert list(step.headers) == [*CREATE_HEADERS, Headers.TRACEPARENT]
    parsed = parse_envelope(step.headers, step.body, max_body_bytes=LIMIT)
    assert (parsed.kind, parsed.traceparent) == (MessageKind.STEP, TRACEPARENT)
    timer = DueTimer(key, MODULE, 3, 1, 0, datetime.now(UTC))
    wake = wake_message(Topology(), timer)
    assert parse_envelope(wake.headers, wake.body, max_body_bytes=LIMIT).kind is MessageKind.WAKE
    assert Headers.TRACEPARENT not in wake.headers
    traced = wake_message(
        Topology(), DueTimer(key, MODULE, 3, 1, 0, datetime.now(UTC), TRACEPARENT)
    )
    assert parse_envelope(traced.headers, traced.body, max_body_bytes=LIMIT).traceparent == (
        TRACEPARENT
    )


def _read_and_validated(headers: dict[str, Any]) -> tuple[Any, Any]:
    """What Headers.read and Headers.model_validate make of one header table."""
    try:
        read: Any = (Headers.read(headers), None)
    except InvalidMessage as refused:
        read = ("refused", refused.reason, refused.detail)
    try:
        validated: Any = (Headers.model_validate(headers).model_dump(), None)
    except ValidationError as exc:
        found = refusal(exc)
        validated = ("refused", found.reason, found.detail)
    return read, validated


@pytest.mark.parametrize(
    "headers",
    [
        *(param.values[0] for param in REFUSALS),
        CREATE_HEADERS,
        _with(x_kind="event", x_module=None),
        _with(x_kind="event", x_module=""),
        _with(traceparent=TRACEPARENT, x_schema_version=1),
        _with(traceparent="00-ab-cd-01"),
        _with(traceparent=b"\xff"),
        _with(traceparent=[1]),
        _with(traceparent=b"\xff", x_tenant="Acme"),
        {"tenant": "acme", "instance_id": "i", "kind": "event", "schema_version": "1"},
    ],
)
def test_fast_header_read_agrees_with_the_model(headers: dict[str, Any]):
    """parse_envelope's fast path (Headers.read) accepts and refuses exactly as validating
    the Headers model does, with the same reason and detail."""
    read, validated = _read_and_validated(headers)
    assert read == validated


@pytest.mark.parametrize(
    ("value", "read"),
    [
        pytest.param(TRACEPARENT, TRACEPARENT, id="version-00"),
        pytest.param(TRACEPARENT.upper(), None, id="upper-case"),
        pytest.param(TRACEPARENT + "-extra", None, id="00-with-more"),
        pytest.param("ff" + TRACEPARENT[2:], None, id="version-ff"),
        pytest.param("01" + TRACEPARENT[2:] + "-later", TRACEPARENT, id="later-version"),
        pytest.param("01" + TRACEPARENT[2:] + "later", None, id="later-version-no-dash"),
        pytest.param(f"00-{'0' * 32}-00f067aa0ba902b7-01", None, id="zero-trace"),
        pytest.param(f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01", None, id="zero-parent"),
        pytest.param("00-ab-cd-01", None, id="short"),
        pytest.param("", None, id="empty"),
        pytest.param(TRACEPARENT + "-" + "x" * 600, None, id="huge"),
    ],
)
def test_traceparent_is_read_as_the_w3c_recommendation_says(value: str, read: str | None):
    """A traceparent is kept (in its version-00 form) only when it is a W3C trace context."""
    assert read_traceparent(value) == read


@pytest.mark.parametrize("value", ["00-ab-cd-01", b"\xff", [1], 7, TRACEPARENT.upper()])
def test_a_bad_traceparent_is_dropped_not_refused(value: object):
    """A message whose traceparent is not a W3C trace context is processed as if it had none:
    the trace context is untrusted and never costs a message its delivery."""
    envelope = parse_envelope(_with(traceparent=value), CREATE_BODY, max_body_bytes=LIMIT)
    assert envelope.traceparent is None


def test_producer_refuses_a_traceparent_workers_would_drop():
    """The producer API refuses to send a trace context that workers would ignore."""
    request = CreateRequest("acme", MODULE, instance_id="x", traceparent="00-ab-cd-01")
    with pytest.raises(ValueError, match="is not a version-00 W3C trace context"):
        create_message(Topology(), request)
