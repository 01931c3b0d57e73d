"""``stream_options.include_usage`` of llmpods_server, on the real llama-cpp-python and the demo model, in process.

The usage chunk must carry what the same request gets without streaming.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, need_module

sys.dont_write_bytecode = True  # keep files/docker free of __pycache__
sys.path.insert(0, str(ROOT / "files" / "docker"))

llama_cpp = need_module("llama_cpp", "llama-cpp-python[server] (requirements-dev.txt, `make dev`)")
from fastapi.testclient import TestClient  # noqa: E402
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402
from llmpods_server import server  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Say hello."}]
SEED = 1234


@pytest.fixture(scope="module")
def client(demo_model: Path) -> Iterator[TestClient]:
    app = server.build_app(
        ServerSettings(),
        [ModelSettings(model=str(demo_model), model_alias="smollm2", n_ctx=2048, n_threads=2, verbose=False)],
    )
    with TestClient(app) as test_client:
        yield test_client


def events(response) -> list:
    found = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


def stream(client: TestClient, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return events(response)


def text_of(path: str, choice: dict) -> str:
    if path == COMPLETIONS:
        return choice.get("text") or ""
    return (choice.get("message") or choice.get("delta") or {}).get("content") or ""


def forget_context(client: TestClient) -> None:
    """Leave the model with a context that shares no prefix with the next request.

    llama-cpp-python reuses the prefix a prompt shares with the previous request; a prompt evaluated partly from
    that cache can get slightly different logits than one evaluated whole, and so a different greedy answer.
    Both requests of a comparison start from here, so both evaluate their whole prompt.
    """
    answer = client.post(COMPLETIONS, json={"prompt": "Zebra", "max_tokens": 1, "temperature": 0})
    assert answer.status_code == 200, answer.text


USAGE_CASES = [
    (CHAT, {"messages": HI, "max_tokens": 1}, "length"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "Write a long story about the sea."}], "max_tokens": 12},
        "length",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "Answer with one word: is water wet?"}], "max_tokens": 10}, None),
    (COMPLETIONS, {"prompt": "The capital of France is", "max_tokens": 1}, "length"),
    (COMPLETIONS, {"prompt": "Emoji party: 🎉🎈", "max_tokens": 10}, "length"),
    (COMPLETIONS, {"prompt": "Count: 1, 2, 3,", "max_tokens": 10, "stop": [" 6"]}, "stop"),
]


@pytest.mark.parametrize(
    ("path", "body", "finish"),
    USAGE_CASES,
    ids=["chat-1", "chat-12", "chat-short", "completion-1", "completion-multibyte", "completion-stop-sequence"],
)
def test_the_usage_chunk_equals_the_usage_without_streaming(
    client: TestClient, path: str, body: dict, finish: str | None
) -> None:
    body = {**body, "temperature": 0, "seed": SEED}
    forget_context(client)
    plain = client.post(path, json=body)
    assert plain.status_code == 200, plain.text
    plain = plain.json()
    forget_context(client)
    found = stream(client, path, {**body, "stream_options": {"include_usage": True}})

    assert found[-1] == "[DONE]"
    *chunks, usage_chunk = found[:-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"]
    streamed_text = "".join(text_of(path, chunk["choices"][0]) for chunk in chunks)
    assert streamed_text == text_of(path, plain["choices"][0]), "not the same answer: the usage cannot be compared"
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    if finish is not None:
        assert plain["choices"][0]["finish_reason"] == finish
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert all("usage" not in chunk for chunk in chunks)
    for field in ("id", "object", "created", "model"):
        assert {chunk[field] for chunk in chunks} == {usage_chunk[field]}, field
    assert usage_chunk["object"] == ("chat.completion.chunk" if path == CHAT else "text_completion")


def test_the_usage_is_counted_in_tokens_not_chunks(client: TestClient) -> None:
    """A stop sequence costs tokens that are never streamed: neither the chunks nor the streamed text count them."""
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 10, "stop": [" 6"], "temperature": 0, "seed": SEED}
    found = stream(client, COMPLETIONS, {**body, "stream_options": {"include_usage": True}})
    content = [chunk for chunk in found[:-2] if chunk["choices"][0]["text"]]
    assert found[-2]["usage"]["completion_tokens"] > len(content)
    tokens = client.post("/extras/tokenize", json={"input": "".join(c["choices"][0]["text"] for c in content)})
    assert found[-2]["usage"]["completion_tokens"] > len(tokens.json()["tokens"])


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}, {"include_usage": None}])
def test_without_include_usage_the_stream_is_unchanged(client: TestClient, path: str, options: dict | None) -> None:
    body = {"messages": HI} if path == CHAT else {"prompt": "Hello"}
    body = {**body, "max_tokens": 2, "temperature": 0}
    if options is not None:
        body["stream_options"] = options
    found = stream(client, path, body)
    assert found[-1] == "[DONE]"
    assert found[-2]["choices"][0]["finish_reason"] is not None
    assert all(set(chunk) == {"id", "object", "created", "model", "choices"} for chunk in found[:-1])


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options", "invalid_value"),
        ({"stream": True, "stream_options": "include_usage"}, "stream_options", "invalid_type"),
        ({"stream": True, "stream_options": [True]}, "stream_options", "invalid_type"),
        ({"stream": True, "stream_options": True}, "stream_options", "invalid_type"),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage", "invalid_type"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
    ],
    ids=["no-stream", "stream-false", "string", "list", "boolean", "usage-string", "usage-number"],
)
def test_stream_options_it_cannot_use_are_a_400(
    client: TestClient, path: str, extra: dict, param: str, code: str
) -> None:
    body = {"messages": HI} if path == CHAT else {"prompt": "Hello"}
    response = client.post(path, json={**body, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_null_stream_options_without_stream_is_no_option(client: TestClient) -> None:
    response = client.post(CHAT, json={"messages": HI, "max_tokens": 1, "stream_options": None})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1
