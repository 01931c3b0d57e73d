"""Server-sent events as the OpenAI streaming API sends them."""

from __future__ import annotations

import json
from collections.abc import Iterable


def data_events(lines: Iterable[str]) -> list:
    """The ``data:`` payloads of an event stream's lines: each chunk as JSON, and ``"[DONE]"`` as it is."""
    found = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found
