"""``stream_options.include_usage`` and ``GET /metrics`` of llmpods_server, on the real llama-cpp-python and the
demo model, in process.

The usage chunk must carry what the same request gets without streaming; the token counters must rise by what the
responses reported; ``/metrics`` must answer while a generation holds the model.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, need_module
from helpers.sse import data_events

sys.dont_write_bytecode = True  # keep files/docker free of __pycache__
sys.path.insert(0, str(ROOT / "files" / "docker"))

llama_cpp = need_module("llama_cpp", "llama-cpp-python[server] (requirements-dev.txt, `make dev`)")
need_module("prometheus_client", "prometheus-client (the server's /metrics)")
from fastapi.testclient import TestClient  # noqa: E402
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402
from llmpods_server import server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Say hello."}]
SEED = 1234
WAIT = 120  # seconds: a request that takes longer than this on the demo model is stuck
CORE = {
    "llamacpp:prompt_tokens": "counter",
    "llamacpp:prompt_tokens_cached": "counter",
    "llamacpp:tokens_predicted": "counter",
    "llamacpp:requests_processing": "gauge",
    "llamacpp:requests_deferred": "gauge",
    "llmpods_requests": "counter",
    "llmpods_request_duration_seconds": "histogram",
    "llmpods_time_to_first_token_seconds": "histogram",
}


@pytest.fixture(scope="module")
def client(demo_model: Path) -> Iterator[TestClient]:
    app = server.build_app(
        ServerSettings(),
        [ModelSettings(model=str(demo_model), model_alias="smollm2", n_ctx=2048, n_threads=2, verbose=False)],
    )
    with TestClient(app) as test_client:
        yield test_client


def stream(client: TestClient, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return data_events(response.iter_lines())


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


def metrics(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``, by name and labels, parsed with prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


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


def test_the_token_counters_rise_by_the_usage_reported(client: TestClient) -> None:
    chat = {"messages": HI, "max_tokens": 3, "temperature": 0, "seed": SEED}
    completion = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "seed": SEED}
    with_usage = {"stream_options": {"include_usage": True}}
    before = metrics(client)
    usages = [
        client.post(CHAT, json=chat).json()["usage"],
        stream(client, CHAT, {**chat, **with_usage})[-2]["usage"],
        client.post(COMPLETIONS, json=completion).json()["usage"],
        stream(client, COMPLETIONS, {**completion, **with_usage})[-2]["usage"],
    ]
    after = metrics(client)

    def rise(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_tokens = sum(usage["prompt_tokens"] for usage in usages)
    assert rise("llamacpp:prompt_tokens_total") + rise("llamacpp:prompt_tokens_cached_total") == prompt_tokens
    assert rise("llamacpp:prompt_tokens_cached_total") > 0, "the repeated prompts reuse the context"
    assert rise("llamacpp:tokens_predicted_total") == sum(usage["completion_tokens"] for usage in usages) > 0
    for route in (CHAT, COMPLETIONS):
        assert rise("llmpods_requests_total", route=route, status="200") == 2
        assert rise("llmpods_request_duration_seconds_count", route=route) == 2
        assert rise("llmpods_request_duration_seconds_sum", route=route) > 0
    assert rise("llmpods_time_to_first_token_seconds_count") == 4
    assert rise("llmpods_time_to_first_token_seconds_sum") > 0


def test_prompt_tokens_evaluated_and_reused_are_told_apart(client: TestClient) -> None:
    """llama-server's meaning: ``prompt_tokens_total`` counts what was evaluated, the reused prefix is cached."""
    body = {"prompt": "Quietly the river flows", "max_tokens": 2, "temperature": 0}
    forget_context(client)  # the prompt shares no prefix with the context: all of it is evaluated
    before = metrics(client)
    first = client.post(COMPLETIONS, json=body).json()["usage"]
    middle = metrics(client)
    second = client.post(COMPLETIONS, json=body).json()["usage"]  # the same prompt: its prefix is reused
    after = metrics(client)
    assert first["prompt_tokens"] == second["prompt_tokens"]
    processed, cached = "llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total"
    assert value(middle, processed) - value(before, processed) == first["prompt_tokens"]
    assert value(middle, cached) == value(before, cached)
    assert 0 < value(after, cached) - value(middle, cached) < second["prompt_tokens"]
    assert (
        value(after, processed) - value(middle, processed) + value(after, cached) - value(middle, cached)
        == (second["prompt_tokens"])
    )


def test_refused_requests_are_counted_under_their_status(client: TestClient) -> None:
    before = metrics(client)
    assert client.post(CHAT, json={"messages": "hi"}).status_code == 422
    assert client.post(CHAT, json={"messages": HI, "stream_options": {"include_usage": True}}).status_code == 400
    assert client.post("/extras/detokenize", json={"tokens": [-1]}).status_code == 400
    assert client.get(CHAT).status_code == 405
    assert client.get("/v1/models").status_code == 200
    assert client.post("/extras/tokenize/count", json={"input": "two words"}).status_code == 200
    assert client.get("/v1/nothing").status_code == 404
    after = metrics(client)
    expected = {
        (CHAT, "422"): 1,
        (CHAT, "400"): 1,
        (CHAT, "405"): 1,
        ("/extras/detokenize", "400"): 1,
        ("/v1/models", "200"): 1,
        ("/extras/tokenize/count", "200"): 1,
    }
    for (route, status), count in expected.items():
        rise = value(after, "llmpods_requests_total", route=route, status=status)
        rise -= value(before, "llmpods_requests_total", route=route, status=status)
        assert rise == count, (route, status)
    routes = {dict(labels).get("route") for name, labels in after if name == "llmpods_requests_total"}
    assert "/v1/nothing" not in routes and "/metrics" not in routes
    assert value(after, "llmpods_time_to_first_token_seconds_count") == value(
        before, "llmpods_time_to_first_token_seconds_count"
    ), "a refused request generated nothing"


def test_metrics_parse_with_their_types_and_read_zero_when_idle(client: TestClient) -> None:
    response = client.get("/metrics")
    families = {family.name: family.type for family in text_string_to_metric_families(response.text)}
    assert {name: families.get(name) for name in CORE} == CORE
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total"):
        assert f"# TYPE {name} counter" in response.text
    samples = metrics(client)
    assert value(samples, "llamacpp:requests_processing") == 0
    assert value(samples, "llamacpp:requests_deferred") == 0
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_metrics_answer_while_a_generation_holds_the_model(client: TestClient) -> None:
    """A stream that is paused after its first chunk keeps the model lock; a model request waits, /metrics not."""
    started, resume = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def generate() -> None:
        body = {"messages": HI, "max_tokens": 4, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        with client.stream("POST", CHAT, json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            results["first"] = json.loads(first[len("data: ") :])
            started.set()
            resume.wait(WAIT)  # the server cannot send more: the stream, and the lock, are held here
            results["rest"] = [line for line in lines if line.startswith("data: ")]

    def list_models() -> None:
        results["models"] = client.get("/v1/models").status_code

    def scrape() -> None:
        try:
            results["metrics"] = metrics(client)
        except Exception as exc:  # reported by the test thread
            results["metrics"] = exc

    generation = threading.Thread(target=generate, daemon=True)
    waiting = threading.Thread(target=list_models, daemon=True)
    try:
        generation.start()
        assert started.wait(WAIT), "the stream never started"
        waiting.start()
        for _unused in range(100):  # until the models request is queued behind the generation
            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
            scraper.join(30)
            assert not scraper.is_alive(), "/metrics did not answer while a generation held the model"
            samples = results["metrics"]
            assert isinstance(samples, dict), samples
            if value(samples, "llamacpp:requests_deferred") >= 1:
                break
            time.sleep(0.05)
        assert value(samples, "llamacpp:requests_deferred") == 1
        assert value(samples, "llamacpp:requests_processing") == 1
        assert waiting.is_alive() and "models" not in results, "the models request did not wait for the model"
        assert generation.is_alive()
    finally:
        resume.set()
        generation.join(WAIT)
        waiting.join(WAIT)
    assert results["models"] == 200
    rest = results["rest"]
    assert rest[-1] == "data: [DONE]" and '"usage"' in rest[-2]
    idle = metrics(client)
    assert value(idle, "llamacpp:requests_processing") == 0
    assert value(idle, "llamacpp:requests_deferred") == 0
