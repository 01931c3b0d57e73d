"""``/v1/completions`` and ``/v1/chat/completions``, whose streams fail like the same request without streaming.

llama-cpp-python answers a streamed request with ``200 text/event-stream`` at once and only then starts the
model, so a prompt longer than the context ends the stream without a single event. Here the first chunk is
made before the response starts: a failure up to there gets the status and JSON error of the same request
without ``stream``; a failure after it ends the stream with an error event, ``data: {"error": {...}}`` (the
OpenAI SDKs raise it), and ``data: [DONE]``.

The model lock is taken before the first chunk and released when the response is over, whatever ended it (the
last chunk, an error, the client leaving), so a broken stream never leaves the model locked.

``stream_options: {"include_usage": true}`` (which llama-cpp-python ignores) adds, after the last chunk and before
``[DONE]``, the chunk OpenAI specifies: the stream's id, object, created and model, ``"choices": []`` and the
``usage`` the same request gets without ``stream`` (counted by ``usage.TokenMeter``). Without it the chunks are
llama-cpp-python's own. Every generation also feeds the token counters and gauges of ``/metrics``.

Also here: ``guard_grammars``. A grammar llama.cpp cannot parse (a ``grammar`` field, or one made from a
``response_format`` schema) crashes the whole server when it is put into the sampler; guarded, it is a 400.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import llama_cpp
from fastapi import HTTPException, Request, status
from llama_cpp import _internals
from llama_cpp import _logger as llama_logger
from llama_cpp.server import app as llama_app
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.types import Receive, Scope, Send

from llmpods_server import metrics as server_metrics
from llmpods_server.count import completion_prompt_tokens
from llmpods_server.errors import RequestError, exception_error, log_failure
from llmpods_server.usage import TokenMeter, stream_usage_requested, usage_chunk

# Request fields each route leaves out before calling the model, as llama-cpp-python's routes do.
COMPLETION_EXCLUDE = {"n", "best_of", "logit_bias_type", "user", "min_tokens"}
CHAT_EXCLUDE = {"n", "logit_bias_type", "user", "min_tokens"}
DONE = {"data": "[DONE]"}


class ModelStream(EventSourceResponse):
    """Server-sent events from the model; when the response ends, the chunks are closed and the lock released."""

    def __init__(self, events: AsyncIterator[dict], chunks: Iterator[Any], lock: contextlib.AsyncExitStack) -> None:
        super().__init__(events, sep="\n", ping_message_factory=llama_app._ping_message_factory)
        self._events, self._chunks, self._lock = events, chunks, lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(RuntimeError):
                    await self._events.aclose()  # type: ignore[attr-defined]
                with contextlib.suppress(ValueError):
                    await run_in_threadpool(getattr(self._chunks, "close", lambda: None))
                await self._lock.aclose()


async def _events(
    request: Request,
    first: Any,
    chunks: Iterator[Any],
    raw_body: bytes,
    usage: Callable[[], dict[str, int]] | None = None,
) -> AsyncIterator[dict]:
    """The chunks as events; with ``usage``, a usage chunk after the last one (not after an error)."""
    server_settings = next(llama_app.get_server_settings(), None)
    interrupt = bool(server_settings and server_settings.interrupt_requests)
    try:
        if first is not None:
            last = first
            yield {"data": json.dumps(first)}
            async for chunk in iterate_in_threadpool(chunks):
                last = chunk
                yield {"data": json.dumps(chunk)}
                if await request.is_disconnected():
                    return
                if interrupt and llama_app.llama_outer_lock.locked():
                    break  # INTERRUPT_REQUESTS=true: another request is waiting
            if usage is not None:
                yield {"data": json.dumps(usage_chunk(last, usage()))}
    except Exception as exc:  # after the first chunk, an error event is all that can be sent
        status_code, error = exception_error(exc, raw_body)
        if status_code >= 500:
            log_failure(exc, f"{request.method} {request.url.path} (streaming)")
        yield {"data": json.dumps(error)}
    yield DONE


def _check_request(llama: llama_cpp.Llama, body: Any, kwargs: dict) -> None:
    """What llama-cpp-python would only notice mid-generation, or not at all.

    An empty completion prompt is nothing to continue from when the model adds no start token. A logit bias for a
    token the model does not have fails inside a sampler callback, where the error is printed (with the value) and
    ignored.
    """
    empty = isinstance(body, CreateCompletionRequest) and body.prompt == "" and not body.suffix
    if empty and not completion_prompt_tokens(llama, ""):
        raise RequestError("prompt: the prompt is empty.", param="prompt", code="invalid_value")
    n_vocab = llama.n_vocab()
    for key, bias in (kwargs.get("logit_bias") or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < n_vocab or not math.isfinite(bias):
            message = f"logit_bias: {str(key)[:40]!r} is not a token id of this model (0 to {n_vocab - 1})"
            raise RequestError(f"{message} with a finite bias.", param="logit_bias", code="invalid_value")


class _Generation(contextlib.ExitStack):
    """What runs while a request has the model: its token meter and the ``requests_processing`` gauge."""

    def __init__(self, llama: llama_cpp.Llama, metrics: server_metrics.Metrics | None) -> None:
        super().__init__()
        self.meter = self.enter_context(TokenMeter(llama, metrics))
        if metrics is not None:
            self.enter_context(metrics.requests_processing.track_inprogress())


async def _generate(
    request: Request, body: Any, model: str | None, call: Any, kwargs: dict, include_usage: bool = False
) -> Any:
    proxy = contextlib.asynccontextmanager(llama_app.get_llama_proxy)
    metrics = server_metrics.of(request)
    if not kwargs.get("stream", False):
        async with proxy() as llama_proxy:
            llama = llama_app.prepare_request_resources(body, llama_proxy, model, kwargs)
            _check_request(llama, body, kwargs)
            if await request.is_disconnected():
                raise HTTPException(status_code=status.HTTP_400_BAD_REQUEST, detail="Client closed request")
            with _Generation(llama, metrics):
                answer = await run_in_threadpool(call, llama, **kwargs)
            if metrics is not None:
                metrics.first_token(request)
            return answer

    lock = contextlib.AsyncExitStack()
    llama_proxy = await lock.enter_async_context(proxy())
    try:
        llama = llama_app.prepare_request_resources(body, llama_proxy, model, kwargs)
        _check_request(llama, body, kwargs)
        generation = lock.enter_context(_Generation(llama, metrics))  # left before the lock is released
        chunks = await run_in_threadpool(call, llama, **kwargs)
        first = await run_in_threadpool(next, chunks, None)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await lock.aclose()
        raise
    if metrics is not None and first is not None:
        metrics.first_token(request)
    usage = generation.meter.usage if include_usage else None
    return ModelStream(_events(request, first, chunks, await request.body(), usage), chunks, lock)


async def create_completion(request: Request, body: CreateCompletionRequest) -> Any:
    include_usage = stream_usage_requested(await request.body(), body.stream)
    if isinstance(body.prompt, list):
        if len(body.prompt) > 1:
            raise RequestError("prompt: send one prompt per request.", param="prompt", code="invalid_value")
        body.prompt = body.prompt[0] if body.prompt else ""
    kwargs = body.model_dump(exclude=COMPLETION_EXCLUDE)
    return await _generate(request, body, body.model, llama_cpp.Llama.__call__, kwargs, include_usage)


async def create_chat_completion(request: Request, body: CreateChatCompletionRequest) -> Any:
    include_usage = stream_usage_requested(await request.body(), body.stream)
    kwargs = body.model_dump(exclude=CHAT_EXCLUDE)
    return await _generate(request, body, body.model, llama_cpp.Llama.create_chat_completion, kwargs, include_usage)


def _add_checked_grammar(self: Any, model: Any, grammar: Any) -> None:
    """``LlamaSampler.add_grammar`` that refuses a grammar llama.cpp cannot parse instead of crashing on it.

    llama.cpp logs the grammar it failed to parse; that is request content, so its log is held back meanwhile.
    """
    level = llama_logger.logger.level
    llama_logger.logger.setLevel(logging.CRITICAL + 1)
    try:
        sampler = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
    finally:
        llama_logger.logger.setLevel(level)
    if not sampler:
        raise RequestError("grammar: llama.cpp cannot parse this grammar.", param="grammar", code="invalid_grammar")
    llama_cpp.llama_sampler_chain_add(self.sampler, sampler)


def guard_grammars() -> None:
    _internals.LlamaSampler.add_grammar = _add_checked_grammar  # type: ignore[method-assign]
