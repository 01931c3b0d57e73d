"""The project's inference server with faults to inject, for the gateway tests that need a model failing mid-way.

A chat completion whose ``stop`` list holds one of the markers below runs on the real model, but fails after its
first chunk, as a model that breaks mid-generation would. The exception's message quotes the last message of the
request, so a test can show that it reaches no log. Everything else is llmpods_server unchanged.

Run as ``python -m helpers.gateway_fault_server`` with ``files/docker`` and ``tests`` on ``PYTHONPATH``, configured
like ``python -m llmpods_server`` (MODEL, MODEL_ALIAS, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import llama_cpp

# Fails with a RuntimeError (the server's fault: a 500-class error event).
SERVER_FAULT = "llmpods-test-server-fault-after-first-chunk"
# Fails with a ValueError (the request's fault: a 400-class error event).
REQUEST_FAULT = "llmpods-test-request-fault-after-first-chunk"


def _failing(chunks: Iterator[Any], error: Exception) -> Iterator[Any]:
    try:
        yield next(chunks, None)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    raise error


def install() -> None:
    create_chat_completion = llama_cpp.Llama.create_chat_completion

    def faulty(self: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Any:
        result = create_chat_completion(self, *args, **kwargs)
        stop = kwargs.get("stop") or []
        quoted = str((kwargs.get("messages") or [{}])[-1].get("content"))
        if kwargs.get("stream") and SERVER_FAULT in stop:
            return _failing(result, RuntimeError(f"injected server fault after the first chunk: {quoted}"))
        if kwargs.get("stream") and REQUEST_FAULT in stop:
            return _failing(result, ValueError(f"injected request fault after the first chunk: {quoted}"))
        return result

    llama_cpp.Llama.create_chat_completion = faulty  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from llmpods_server.server import main

    main()
