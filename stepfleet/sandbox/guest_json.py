"""JSON from guests: RFC 8259 only, with bounded nesting (docs/guest-abi.md)."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final, NoReturn

MAX_JSON_DEPTH: Final = 256
"""Deepest nesting of arrays and objects a guest may hand over: far below Python's recursion
limit, so that nothing reading the value later (engine, store, CLI) can hit it."""

# A JSON string, or an unterminated one running to the end of the text. Possessive and always
# matching, so that no text can make the scan backtrack (it stays linear).
_STRING = re.compile(r'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]++")


class JsonTooDeep(ValueError):
    """The JSON nests deeper than MAX_JSON_DEPTH."""


def parse_guest_json(text: str) -> Any:
    """Parse JSON a guest handed over.

    Raises:
        JsonTooDeep: "nested deeper than 256 levels".
        ValueError: "not valid JSON" (NaN, Infinity and integers of more than 4300 digits
            included).
    """
    if _too_deep(text):
        raise JsonTooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None


def _too_deep(text: str) -> bool:
    """Whether brackets outside strings nest deeper than the limit (before parsing: the parser
    itself recurses once per level)."""
    # Counting runs at C speed; only text with that many brackets is scanned.
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    brackets = _NOT_BRACKETS.sub("", _STRING.sub("", text))
    return max(accumulate((1 if c in "[{" else -1 for c in brackets), initial=0)) > MAX_JSON_DEPTH


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
"""One decoder for every parse (`json.loads` with an argument builds a new one each call)."""
