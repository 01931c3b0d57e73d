"""Server-sent events as the OpenAI streaming API sends them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator


def stream_events(lines: Iterable[str | bytes]) -> Iterator[object]:
    """The ``data:`` payloads of an event stream's lines as they arrive: each chunk as JSON, ``"[DONE]"`` as it is.

    ``lines`` may be text or bytes, with or without their line ends (``readline``, ``iter_lines``, ``splitlines``).
    """
    for line in lines:
        text = (line.decode() if isinstance(line, bytes) else line).strip()
        if text.startswith("data: "):
            payload = text[len("data: ") :]
            yield payload if payload == "[DONE]" else json.loads(payload)


def data_events(lines: Iterable[str | bytes]) -> list:
    """Every ``data:`` payload of a whole event stream (see stream_events)."""
    return list(stream_events(lines))
