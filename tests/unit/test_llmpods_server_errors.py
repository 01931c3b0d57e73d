"""The inference server's answers to bad input (issue 12), in process: llmpods_server's app on the real
llama-cpp-python and the demo model, without the gateway in front (the gateway tests cover both together).

Every failure is an OpenAI-style error (``{"error": {"message", "type", "param", "code"}}``), 4xx when the request
caused it, never a traceback; a failed request leaves the model usable; nothing logged quotes the request.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, need_module
from helpers.sse import data_events

sys.dont_write_bytecode = True  # keep files/docker free of __pycache__
sys.path.insert(0, str(ROOT / "files" / "docker"))

llama_cpp = need_module("llama_cpp", "llama-cpp-python[server] (requirements-dev.txt, `make dev`)")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402
from llmpods_server import errors, server  # noqa: E402

SECRET = "sk-secret-" + uuid.uuid4().hex  # must never reach a log
HI = [{"role": "user", "content": "Say hello."}]
LONG = [{"role": "user", "content": "word " * 3000}]
JSON = "application/json"


@pytest.fixture(scope="module")
def client(demo_model: Path) -> TestClient:
    app = server.build_app(
        ServerSettings(),
        [ModelSettings(model=str(demo_model), model_alias="smollm2", n_ctx=2048, n_threads=2, verbose=False)],
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def error_of(response) -> dict:
    text = response.text
    assert "Traceback" not in text and 'File "' not in text and "site-packages" not in text, text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def works(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code", "param"),
    [
        (b"{bad", JSON, 400, "invalid_json", None),
        (b'{"messages": "hi"}', JSON, 422, "invalid_type", "messages"),
        (json.dumps({"messages": HI, "max_tokens": "x"}).encode(), JSON, 422, "invalid_type", "max_tokens"),
        (json.dumps({"messages": HI, "top_k": -5}).encode(), JSON, 422, "invalid_value", "top_k"),
        (json.dumps({"messages": HI}).encode(), "text/plain", 400, "invalid_content_type", None),
        (b"[" * 50_000 + b"]" * 50_000, JSON, 400, "invalid_request", None),
    ],
)
def test_a_body_it_cannot_use_is_a_4xx_naming_the_field(
    client: TestClient, content: bytes, content_type: str, status: int, code: str, param: str | None
) -> None:
    response = client.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type})
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    works(client)


def test_paths_and_methods_it_does_not_serve_are_json_errors(client: TestClient) -> None:
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "unknown_url"
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "grammar": 'root ::= root "a"'}, "invalid_grammar"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "logit_bias": {"99999999": 1}}, "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "logit_bias": {"abc": 1}}, "invalid_value"),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, "invalid_value"),
        ("/v1/completions", {"prompt": "", "max_tokens": 2}, "invalid_value"),
        ("/extras/detokenize", {"tokens": [-1]}, "invalid_value"),
        ("/extras/detokenize", {"tokens": [49152]}, "invalid_value"),
        ("/v1/embeddings", {"input": "hi"}, "embeddings_not_supported"),
    ],
)
def test_input_that_used_to_crash_or_fail_the_server_is_a_400(
    client: TestClient, path: str, body: dict, code: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == code
    works(client)


def test_a_stream_failing_before_its_first_token_answers_like_without_streaming(client: TestClient) -> None:
    for path, body in [
        ("/v1/chat/completions", {"messages": LONG, "max_tokens": 16}),
        ("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 16}),
    ]:
        plain = client.post(path, json=body)
        streamed = client.post(path, json={**body, "stream": True})
        assert plain.status_code == streamed.status_code == 400
        assert streamed.json() == plain.json()
        assert error_of(streamed)["code"] == "context_length_exceeded"
    works(client)


@pytest.mark.parametrize(
    ("exception", "error_type"), [(RuntimeError, "server_error"), (ValueError, "invalid_request_error")]
)
def test_a_stream_failing_after_its_first_token_ends_with_an_error_event_and_done(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, exception, error_type: str
) -> None:
    create = llama_cpp.Llama.create_chat_completion

    def fails_after_one_chunk(self, *args, **kwargs):
        chunks = create(self, *args, **kwargs)
        yield next(chunks, None)
        chunks.close()
        raise exception(f"failed mid-way on {SECRET}")

    monkeypatch.setattr(llama_cpp.Llama, "create_chat_completion", fails_after_one_chunk)
    caplog.set_level(logging.ERROR)
    with client.stream("POST", "/v1/chat/completions", json={"messages": HI, "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        found = data_events(r.iter_lines())
    monkeypatch.undo()
    assert found[-1] == "[DONE]"
    assert "choices" in found[0]
    assert found[-2]["error"]["type"] == error_type
    assert SECRET not in caplog.text
    if error_type == "server_error":
        assert SECRET not in json.dumps(found[-2])
        assert "RuntimeError while serving POST /v1/chat/completions" in caplog.text
    works(client)


def test_an_exception_no_handler_caught_closes_the_connection_and_logs_no_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()

    @app.middleware("http")
    async def explode(request, call_next):
        raise RuntimeError(f"boom {SECRET}")

    errors.install(app)
    caplog.set_level(logging.ERROR)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/anything")
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert error_of(response)["type"] == "server_error"
    assert SECRET not in response.text and SECRET not in caplog.text
    assert "RuntimeError while serving GET /anything" in caplog.text


def test_exception_classes() -> None:
    assert errors.exception_error(ValueError("no good"))[0] == 400
    assert errors.exception_error(KeyError("function"))[1]["error"]["message"] == "Invalid request: KeyError 'function'"
    status, body = errors.exception_error(RuntimeError(f"internal {SECRET}"))
    assert status == 500 and SECRET not in json.dumps(body)
    status, body = errors.exception_error(ValueError("Requested tokens (3000) exceed context window of 2048"))
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
    refused = errors.RequestError("nope", status=413, code="too_big", param="x")
    assert errors.exception_error(refused) == (413, errors.error_body("nope", code="too_big", param="x"))
