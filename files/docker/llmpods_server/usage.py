"""Token usage of a generation as it runs, for ``stream_options.include_usage`` and the token counters.

llama-cpp-python reports ``usage`` only without streaming, and there from variables local to
``Llama._create_completion``: ``prompt_tokens`` is the length of the prompt it hands to ``Llama.generate``,
``completion_tokens`` the tokens ``generate`` yields that it keeps (every one but an end-of-generation token),
plus a BOS token it puts first when the prompt is empty. A streamed chunk is not one token (a character split
over tokens, or text held back while it may be a stop sequence, waits for the next), so the chunks cannot be
counted instead. ``TokenMeter`` measures the same numbers where they are made: for one request, while the
request holds the model lock, it wraps that model's ``_create_completion``, ``generate`` and ``eval`` (instance
attributes that shadow the class's methods, removed again before the lock is released).

It also tells apart the prompt tokens llama.cpp evaluated from those it reused from the previous request's
context (a common prefix), which is how llama-server counts ``llamacpp:prompt_tokens_total``.

``stream_usage_requested`` reads ``stream_options`` from the raw request body: llama-cpp-python's request
models do not have the field, and pydantic drops it.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from typing import Any, Protocol

import llama_cpp

from llmpods_server.errors import RequestError

# Fields the usage chunk copies from the chunks before it, as OpenAI and llama-server send it.
CHUNK_FIELDS = ("id", "object", "created", "model", "system_fingerprint")
METERED = ("_create_completion", "generate", "eval")


class TokenSink(Protocol):
    """Where a meter reports tokens as they are processed (the Prometheus counters)."""

    def prompt_processed(self, evaluated: int, cached: int) -> None: ...

    def token_generated(self) -> None: ...


def stream_usage_requested(raw_body: bytes, stream: bool) -> bool:
    """Whether the request asks for a usage chunk: ``stream_options: {"include_usage": true}``.

    ``null`` counts as absent, for the object and for ``include_usage``, as llama-server takes it. The option
    without ``stream: true``, a ``stream_options`` that is not an object and an ``include_usage`` that is not a
    boolean are refused, as OpenAI refuses them.
    """
    try:
        data = json.loads(raw_body)
    except ValueError:  # the route's own validation has refused it already
        return False
    options = data.get("stream_options") if isinstance(data, dict) else None
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(
            'stream_options: expected an object, such as {"include_usage": true}.',
            param="stream_options",
            code="invalid_type",
        )
    if not stream:
        raise RequestError(
            "stream_options: only allowed when stream is true.", param="stream_options", code="invalid_value"
        )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise RequestError(
            "stream_options.include_usage: expected a boolean.",
            param="stream_options.include_usage",
            code="invalid_type",
        )
    return bool(include_usage)


def usage_chunk(last_chunk: dict, usage: dict[str, int]) -> dict:
    """The chunk after the last one: the stream's id, object, created and model, no choices, and the usage."""
    chunk = {name: last_chunk[name] for name in CHUNK_FIELDS if name in last_chunk}
    chunk["choices"] = []
    chunk["usage"] = usage
    return chunk


class TokenMeter:
    """Counts the tokens of one request's generation on ``llama``, as ``usage`` counts them without streaming.

    Use it as a context manager around everything that runs the model for the request, the whole stream
    included, and only while the request holds the model lock (nothing else may run ``llama`` meanwhile).
    ``sink`` gets the prompt tokens once they are evaluated and each generated token as it is made.
    A chat handler that runs more than one completion (functionary) is counted as llama-cpp-python counts it:
    the last prompt, the completion tokens of all.
    """

    def __init__(self, llama: llama_cpp.Llama, sink: TokenSink | None = None) -> None:
        self.llama, self.sink = llama, sink
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._evaluating_prompt = False
        self._evaluated = 0

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def __enter__(self) -> TokenMeter:
        model = type(self.llama)
        create, generate, evaluate = (getattr(model, name).__get__(self.llama) for name in METERED)

        def metered_create_completion(prompt: str | list[int], *args: Any, **kwargs: Any) -> Any:
            if len(prompt) == 0:  # llama-cpp-python starts the completion tokens with BOS then
                self.completion_tokens += 1
            return create(prompt, *args, **kwargs)

        def metered_generate(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Any, None]:
            return self._generate(generate, tokens, *args, **kwargs)

        def metered_eval(tokens: Sequence[int]) -> None:
            if self._evaluating_prompt:
                self._evaluated += len(tokens)
            evaluate(tokens)

        for name, method in zip(METERED, (metered_create_completion, metered_generate, metered_eval), strict=True):
            setattr(self.llama, name, method)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in METERED:
            self.llama.__dict__.pop(name, None)

    def _prompt_done(self) -> None:
        if self._evaluating_prompt:
            self._evaluating_prompt = False
            if self.sink is not None:
                self.sink.prompt_processed(self._evaluated, max(self.prompt_tokens - self._evaluated, 0))

    def _generate(self, generate: Any, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Generator[int, Any, None]:
        tokens = list(tokens)
        self.prompt_tokens = len(tokens)
        self._evaluating_prompt, self._evaluated = True, 0
        vocab = self.llama._model.vocab
        inner = generate(tokens, *args, **kwargs)
        try:
            sent = None
            while True:
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                self._prompt_done()
                if not llama_cpp.llama_vocab_is_eog(vocab, token):  # kept by _create_completion
                    self.completion_tokens += 1
                    if self.sink is not None:
                        self.sink.token_generated()
                sent = yield token
        finally:
            self._prompt_done()
            inner.close()
