"""HTTP egress as the guest ABI carries it: the request a guest asks for, the answer it gets.

The sandbox reads an `HttpRequest` from the guest's `http_request` JSON and stops the run there
(`CallRequested`); the worker has the egress gateway make the call and answer with an
`HttpResponse`, then runs the guest again, and the sandbox writes the answer back as JSON. See
docs/guest-abi.md, *Calling the outside world*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_REQUEST_FIELDS = frozenset({"method", "url", "headers", "body"})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP call a guest asks for. `body` is text, sent as UTF-8."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""

    @classmethod
    def from_json(cls, text: str) -> HttpRequest:
        """Parse the guest's request JSON; ValueError names what is wrong with its shape.

        Only the shape is checked here (an object with the documented fields and types); what
        may be sent where (method, URL, host, header names) is the gateway's policy.
        """
        try:
            data: Any = json.loads(text)
        except ValueError:
            raise ValueError("is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        unknown = sorted(set(data) - _REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"has an unknown field {unknown[0]!r}")
        method, url = data.get("method"), data.get("url")
        if not isinstance(method, str) or not method:
            raise ValueError('"method" must be a non-empty string')
        if not isinstance(url, str) or not url:
            raise ValueError('"url" must be a non-empty string')
        headers = data.get("headers", {})
        if headers is None:
            headers = {}
        if not isinstance(headers, dict) or not all(
            isinstance(value, str) for value in headers.values()
        ):
            raise ValueError('"headers" must be an object whose values are strings')
        body = data.get("body", "")
        if body is None:
            body = ""
        if not isinstance(body, str):
            raise ValueError('"body" must be a string')
        return cls(method, url, dict(headers), body)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What the guest gets back: a response (any status, redirects included), or an error.

    `error` is set when no response was had (refused by policy, timed out, connection failed,
    over a limit); `status`, `headers` and `body` are then empty. Header names are lower-case;
    repeated headers are joined with ", ".
    """

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    error: str | None = None

    @classmethod
    def failed(cls, message: str) -> HttpResponse:
        """An answer that carries only an error message."""
        return cls(error=message)

    def to_json(self) -> str:
        """The JSON the guest reads: {"status","headers","body"} or {"error"}."""
        if self.error is not None:
            return json.dumps({"error": self.error}, ensure_ascii=False, separators=(",", ":"))
        return json.dumps(
            {"status": self.status, "headers": dict(self.headers), "body": self.body},
            ensure_ascii=False,
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class AnsweredCall:
    """A call a step attempt has made, and its answer: a resumed run hands the answer to the
    guest's call of the same index when the guest asks for the same request again."""

    request: HttpRequest
    response: HttpResponse
