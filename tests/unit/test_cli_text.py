"""What the CLI prints is inert on a terminal: control characters a tenant chose are shown
escaped, never acted on, and JSON output stays exact."""

from __future__ import annotations

import json

import pytest

from stepfleet.cli.common import json_text, say, shown

C0 = "".join(map(chr, range(0x20)))
C1 = "".join(map(chr, range(0x80, 0xA0)))
BIDI = "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
EVERY_CONTROL = C0 + "\x7f" + C1 + BIDI


def inert(text: str, *, layout: bool = False) -> bool:
    allowed = "\n\t" if layout else ""
    return not any(c in EVERY_CONTROL and c not in allowed for c in text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("\x1b]52;c;Zm9v\x07", "\\x1b]52;c;Zm9v\\x07"),
        ("\x9b31m", "\\x9b31m"),
        ("a\u202eb", "a\\u202eb"),
        ("line\nnext\ttab\rback", "line\\nnext\\ttab\\rback"),
        ("del\x7f nul\x00", "del\\x7f nul\\x00"),
        ("plain text, ünïcode ✓", "plain text, ünïcode ✓"),
        (42, "42"),
    ],
)
def test_shown_escapes_what_a_terminal_would_act_on(value, expected):
    assert shown(value) == expected


def test_shown_leaves_nothing_a_terminal_acts_on():
    assert inert(shown(EVERY_CONTROL))


def test_say_keeps_the_layout_and_escapes_the_rest(capsys):
    say("a\tb\nc\x1b[31m\r\u202e")
    out = capsys.readouterr().out
    assert out == "a\tb\nc\\x1b[31m\\r\\u202e\n"
    assert inert(out, layout=True)


def test_json_text_is_inert_and_exact():
    value = {"error": EVERY_CONTROL + "ünïcode", "n": [1, None, True]}
    text = json_text(value, indent=2)
    assert inert(text, layout=True)
    assert json.loads(text) == value


def test_dlq_times_take_an_offset_and_read_a_bare_time_as_utc():
    """`--since`/`--until` accept ISO 8601 with an offset; a time without one is UTC."""
    from datetime import UTC, datetime, timedelta, timezone

    import typer

    from stepfleet.cli.dlq import parse_time

    assert parse_time("2026-11-22T10:00") == datetime(2026, 11, 22, 10, tzinfo=UTC)
    assert parse_time("2026-11-22T10:00Z") == datetime(2026, 11, 22, 10, tzinfo=UTC)
    plus_one = parse_time("2026-11-22T10:00+01:00")
    assert plus_one.utcoffset() == timedelta(hours=1)
    assert plus_one == datetime(2026, 11, 22, 9, tzinfo=UTC)
    assert parse_time("2026-11-22") == datetime(2026, 11, 22, tzinfo=UTC)
    assert parse_time("2026-11-22T10:00-05:00").tzinfo == timezone(timedelta(hours=-5))
    with pytest.raises(typer.BadParameter, match="not an ISO 8601 time"):
        parse_time("yesterday")


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["dlq", "list", "--help"]])
def test_help_shows_flags_without_a_type(args):
    """Flags (`--help`, `--json`, `--replayed`) are shown bare, not as `--help <bool>`."""
    from typer.testing import CliRunner

    from stepfleet.cli.main import app

    shown_help = CliRunner().invoke(app, args).output
    assert "--help" in shown_help
    assert "<bool>" not in shown_help
