"""The server extension against the real llama-cpp-python and the demo model, in process.

The token count must equal what llama-cpp-python itself reports as ``usage.prompt_tokens``; the
test asks the model for one completion token per request and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT, need_module

sys.dont_write_bytecode = True  # keep files/docker free of __pycache__
sys.path.insert(0, str(ROOT / "files" / "docker"))

llama_cpp = need_module("llama_cpp", "llama-cpp-python[server] (requirements-dev.txt, `make dev`)")
from fastapi.testclient import TestClient  # noqa: E402
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402
from llmpods_server import count, server  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain? Écris en une phrase, s'il te plaît."},
    ],
]


@pytest.fixture(scope="module")
def llama(demo_model: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(demo_model), n_ctx=2048, n_threads=2, verbose=False)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system-user", "multi-turn"])
def test_chat_count_equals_usage_prompt_tokens(llama: llama_cpp.Llama, messages: list[dict]) -> None:
    counted = count.chat_prompt_tokens(llama, {"messages": messages})
    usage = llama.create_chat_completion(messages=messages, max_tokens=1, temperature=0)["usage"]
    assert counted == usage["prompt_tokens"]


def test_chat_count_with_tools_and_json_mode(llama: llama_cpp.Llama) -> None:
    request = {"messages": CONVERSATIONS[1], "tools": TOOLS, "response_format": {"type": "json_object"}}
    counted = count.chat_prompt_tokens(llama, request)
    usage = llama.create_chat_completion(**request, max_tokens=1, temperature=0)["usage"]
    assert counted == usage["prompt_tokens"]


def test_string_prompt_gets_bos_like_create_completion(llama: llama_cpp.Llama) -> None:
    text = "The quick brown fox"
    usage = llama.create_completion(text, max_tokens=1, temperature=0)["usage"]
    assert len(count.completion_prompt_tokens(llama, text)) == usage["prompt_tokens"]
    assert count.completion_prompt_tokens(llama, [1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="infill"):
        count.completion_prompt_tokens(llama, text, suffix="x")


# Every way into llama.cpp's evaluation, from the public completion calls down to eval().
GENERATION = {"create_completion", "_create_completion", "__call__", "generate", "eval", "sample", "reset"}


def test_counting_does_not_generate(llama: llama_cpp.Llama) -> None:
    asked: list[str] = []

    class Guard:
        """The model, with every generation entry point refused and recorded."""

        def __getattr__(self, name: str):
            if name in GENERATION:
                asked.append(name)
                raise AssertionError(f"counting asked the model to generate ({name})")
            return getattr(llama, name)

    llama.create_completion("Warm up", max_tokens=1, temperature=0)  # a context with something evaluated in it
    evaluated = (llama.n_tokens, list(llama.input_ids[: llama.n_tokens]))
    counted = count.chat_prompt_tokens(Guard(), {"messages": CONVERSATIONS[0]})
    assert asked == []
    assert (llama.n_tokens, list(llama.input_ids[: llama.n_tokens])) == evaluated, "nothing was evaluated"
    usage = llama.create_chat_completion(messages=CONVERSATIONS[0], max_tokens=1, temperature=0)["usage"]
    assert counted == usage["prompt_tokens"]


@pytest.fixture(scope="module")
def client(demo_model: Path) -> TestClient:
    app = server.build_app(
        ServerSettings(),
        [ModelSettings(model=str(demo_model), model_alias="smollm2", n_ctx=2048, n_threads=2, verbose=False)],
    )
    with TestClient(app) as test_client:
        yield test_client


def test_count_route_replaced_once(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    body = paths[server.COUNT_PATH]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in body["anyOf"]}
    assert refs == {"TokenizeInputRequest", "CountChatRequest"}
    assert {"/v1/models", "/v1/chat/completions", "/extras/tokenize", "/extras/detokenize"} <= set(paths)


def test_count_route_input_and_chat(client: TestClient) -> None:
    text = "How many tokens in this query?"
    tokens = client.post("/extras/tokenize", json={"input": text}).json()["tokens"]
    assert client.post(server.COUNT_PATH, json={"input": text}).json() == {"count": len(tokens)}
    for messages in CONVERSATIONS:
        request = {"model": "smollm2", "messages": messages, "max_tokens": 1, "temperature": 0}
        counted = client.post(server.COUNT_PATH, json=request)
        assert counted.status_code == 200, counted.text
        usage = client.post("/v1/chat/completions", json=request).json()["usage"]
        assert counted.json() == {"count": usage["prompt_tokens"]}


def test_count_route_rejects_other_bodies_like_upstream_routes(client: TestClient) -> None:
    response = client.post(server.COUNT_PATH, json={"text": "neither input nor messages"})
    upstream = client.post("/extras/tokenize", json={"text": "no input"})
    assert response.status_code == upstream.status_code != 200
    message = response.json()["error"]["message"]
    assert "input" in message and "messages" in message


def test_main_reads_environment(monkeypatch: pytest.MonkeyPatch, demo_model: Path) -> None:
    seen = {}

    def fake_run(app, **kwargs):
        seen.update(kwargs, app=app)

    monkeypatch.setenv("MODEL", str(demo_model))
    monkeypatch.setenv("MODEL_ALIAS", "smollm2")
    monkeypatch.setenv("PORT", "8123")
    monkeypatch.setenv("INTERRUPT_REQUESTS", "false")
    monkeypatch.setenv("HOST", "127.0.0.9")
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    monkeypatch.setattr(server.uvicorn, "run", fake_run)
    monkeypatch.setattr(server, "build_app", lambda s, m: (s, m))
    server.main([])
    server_settings, model_settings = seen["app"]
    assert seen["port"] == 8123
    assert seen["host"] == "127.0.0.9"
    assert server_settings.interrupt_requests is False
    assert model_settings[0].model_alias == "smollm2"
    assert model_settings[0].model == str(demo_model)


def test_main_reads_a_config_file(monkeypatch: pytest.MonkeyPatch, demo_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"port: 8124\nmodels:\n  - model: {demo_model}\n    model_alias: a\n  - model: {demo_model}\n")
    seen = {}
    monkeypatch.setenv("CONFIG_FILE", str(config))
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("HOST", raising=False)
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kwargs: seen.update(kwargs, app=app))
    monkeypatch.setattr(server, "build_app", lambda s, m: (s, m))
    server.main([])
    _server_settings, model_settings = seen["app"]
    assert seen["port"] == 8124
    assert [m.model_alias for m in model_settings] == ["a", None]

    monkeypatch.setenv("CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit) as exited:
        server.main([])
    assert exited.value.code == 1
