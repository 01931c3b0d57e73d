"""The gateway as a client sees it: real nginx running the config that roles/gateway renders, in front of
each real backend serving the demo model, llama-cpp-python and llama-server (and, where the test must see exactly
what nginx forwards, a recording stand-in upstream). Every test that takes ``backend`` or ``gateway`` runs against
both backends."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, free_port, need, run_playbook
from helpers import gateway_stub as stub
from helpers.gateway import (
    BACKENDS,
    CONFIG_PLAYBOOK,
    MODEL_NAME,
    Backend,
    Gateway,
    Recorder,
    backend_available,
    bearer,
    error_of,
    nginx_ok,
    request,
    wait_for,
    write_keys,
)
from helpers.sse import stream_events

pytestmark = pytest.mark.slow

KEY_A = "sk-llmpods-" + uuid.uuid4().hex
KEY_B = "sk-llmpods-" + uuid.uuid4().hex
# Keys retired by commenting their line out, the two ways people write it: both must be refused.
RETIRED_A = "sk-llmpods-retired-" + uuid.uuid4().hex
RETIRED_B = "sk-llmpods-retired-" + uuid.uuid4().hex
COMMENTS = f"# API keys for the gateway tests\n#{RETIRED_A}\n# {RETIRED_B}"
IMAGE_PLAYBOOK = ROOT / "tests" / "integration" / "playbooks" / "gateway_image.yml"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def nginx() -> None:
    need(nginx_ok(), "nginx with the njs module (Debian: nginx-light libnginx-mod-http-js)")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(demo_model: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    need(*backend_available(request.param))
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    proc = Backend(demo_model, free_port(), log, kind=request.param).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def gateway(nginx: None, backend: Backend, tmp_path_factory: pytest.TempPathFactory):
    gw = Gateway(
        tmp_path_factory.mktemp("gateway"),
        upstream_port=backend.port,
        listen_port=free_port(),
        gateway_backend=backend.kind,
    )
    write_keys(gw.keys_file, [KEY_A, KEY_B], comment=COMMENTS)
    gw.render(run_playbook)
    gw.start()
    try:
        wait_for(lambda: gw.alive()[0] == 200, 30, what="gateway /alive 200")
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def recorded(nginx: None, tmp_path_factory: pytest.TempPathFactory):
    """A gateway in front of the recording upstream."""
    upstream = Recorder(free_port()).start()
    gw = Gateway(
        tmp_path_factory.mktemp("recorded"), upstream_port=upstream.server.server_port, listen_port=free_port()
    )
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)
    gw.start()
    try:
        yield gw, upstream
    finally:
        gw.stop()
        upstream.stop()


def assert_unauthorized(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 401, body
    assert headers.get("www-authenticate", "").startswith("Bearer"), headers
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) >= ERROR_KEYS
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"


# --- the role


def test_role_is_idempotent_and_check_mode_shows_a_diff(nginx: None, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, upstream_port=8000, listen_port=free_port())
    first = run_playbook(CONFIG_PLAYBOOK, gw.vars)
    assert first.rc == 0, first.failure()
    assert first.changed >= 2
    conf = (gw.config_dir / "nginx.conf").read_text()
    assert conf.startswith("#"), "the rendered config starts with the ansible_managed comment"
    assert (gw.config_dir / "gateway.js").read_text() == (ROOT / "files" / "nginx" / "gateway.js").read_text()
    assert "proxy_read_timeout 300s;" in conf

    second = run_playbook(CONFIG_PLAYBOOK, gw.vars)
    assert second.rc == 0, second.failure()
    assert second.changed == 0, [t["name"] for t in second.tasks() if t["result"].get("changed")]

    check = run_playbook(CONFIG_PLAYBOOK, {**gw.vars, "gateway_proxy_timeout": 600}, check=True, diff=True)
    assert check.rc == 0, check.failure()
    assert check.changed == 1
    [rendered] = [t["result"] for t in check.tasks() if t["name"].endswith("Render nginx.conf")]
    diffs = rendered["diff"] if isinstance(rendered["diff"], list) else [rendered["diff"]]
    assert any("proxy_read_timeout 600s;" in d.get("after", "") for d in diffs)
    assert (gw.config_dir / "nginx.conf").read_text() == conf, "check mode changed nothing"


def test_role_refuses_a_config_that_nginx_rejects(nginx: None, tmp_path: Path) -> None:
    template = tmp_path / "broken.conf.j2"
    template.write_text(
        "{{ ansible_managed | comment }}\n"
        "load_module {{ gateway_js_module_path }};\n"
        "events {}\n"
        "http {\n  js_import gateway from gateway.js;\n"
        "  server { listen {{ gateway_listen_port }}; proxy_pass_everything on; }\n}\n"
    )
    gw = Gateway(tmp_path / "gw", upstream_port=8000, listen_port=free_port(), gateway_template=str(template))
    result = run_playbook(CONFIG_PLAYBOOK, gw.vars)
    assert result.rc != 0
    message = result.failure()
    assert "nginx -t rejected the gateway config for model smollm2" in message
    assert 'unknown directive "proxy_pass_everything"' in message
    assert not (gw.config_dir / "nginx.conf").exists(), "nothing is installed when validation fails"


def test_role_rejects_a_model_name_that_is_not_a_dns_label(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, upstream_port=8000, listen_port=free_port(), model="SmolLM2_135M")
    result = run_playbook(CONFIG_PLAYBOOK, gw.vars)
    assert result.rc != 0
    assert "gateway_model_name must be a DNS label" in result.failure()


# --- auth


UNAUTHORIZED = {
    "no header": [],
    "scheme only": [("Authorization", "Bearer")],
    "scheme and space": [("Authorization", "Bearer ")],
    "wrong key": [("Authorization", "Bearer sk-llmpods-wrong")],
    "key prefix": [("Authorization", f"Bearer {KEY_A[:-1]}")],
    "key plus a char": [("Authorization", f"Bearer {KEY_A}x")],
    "key with a space": [("Authorization", f"Bearer {KEY_A} x")],
    "basic": [("Authorization", "Basic " + __import__("base64").b64encode(f"user:{KEY_A}".encode()).decode())],
    "key alone": [("Authorization", KEY_A)],
    "x-api-key": [("X-Api-Key", KEY_A)],
    "two authorization headers": [("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_B}")],
    "key commented out (#key)": [("Authorization", f"Bearer {RETIRED_A}")],
    "key commented out (# key)": [("Authorization", f"Bearer {RETIRED_B}")],
}


# What a backend received is read from its request log: llama-cpp-python (uvicorn) logs every request, llama-server
# none, so these run against llama-cpp-python; the gateway's checks come before any backend is involved.
REQUEST_LOG = pytest.mark.parametrize("backend", ["llama-cpp-python"], indirect=True)


@REQUEST_LOG
@pytest.mark.parametrize("headers", UNAUTHORIZED.values(), ids=UNAUTHORIZED.keys())
def test_requests_without_a_valid_key_never_reach_the_model(gateway: Gateway, backend: Backend, headers) -> None:
    before = len(backend.requests_seen())
    for method, path, body in [
        ("GET", f"/{MODEL_NAME}/v1/models", None),
        ("GET", f"/{MODEL_NAME}/v1/models?api_key={KEY_A}", None),
        ("POST", f"/{MODEL_NAME}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),
    ]:
        assert_unauthorized(*request(gateway.port, method, path, headers=headers, body=body))
    assert_backend_saw_nothing_since(gateway, backend, before)


def assert_backend_saw_nothing_since(gateway: Gateway, backend: Backend, before: int) -> None:
    """No request reached the backend since it had logged ``before`` of them.

    A request with a valid key, sent last, is the proof that the log is current: once it shows, any request sent
    before it would show as well, so the check cannot pass on a log that was not flushed yet.
    """
    status, _unused, body = request(gateway.port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer(KEY_A))
    assert status == 200, body
    wait_for(lambda: len(backend.requests_seen()) > before, 30, 0.05, "the last request in the backend log")
    new = backend.requests_seen()[before:]
    assert len(new) == 1 and "GET /v1/models " in new[0], new


@REQUEST_LOG
def test_key_in_the_query_string_is_refused_and_not_logged(gateway: Gateway, backend: Backend) -> None:
    before = len(backend.requests_seen())
    assert_unauthorized(*request(gateway.port, "GET", f"/{MODEL_NAME}/v1/models?key={KEY_B}"))
    assert_unauthorized(*request(gateway.port, "GET", f"/v1/models?api_key={KEY_B}"))
    assert_backend_saw_nothing_since(gateway, backend, before)  # the access log is written by then too
    assert KEY_B not in gateway.access_log.read_text()


def test_no_key_reaches_the_error_log(nginx: None, tmp_path: Path) -> None:
    """At notice, the most the role accepts (every higher level logs a part of it), no key shows in the error log."""
    level = "notice"
    upstream = Recorder(free_port()).start()
    gw = Gateway(
        tmp_path, upstream_port=upstream.server.server_port, listen_port=free_port(), gateway_error_log_level=level
    )
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)
    gw.start()
    try:
        for headers in (UNAUTHORIZED["two authorization headers"], bearer(KEY_B), bearer(KEY_A)):
            request(gw.port, "GET", f"/{MODEL_NAME}/v1/models", headers=headers)
    finally:
        gw.stop()
        upstream.stop()
    log = gw.error_log.read_text()
    assert f"[{level}]" in log, f"{level} messages are logged, so the check below can see them: {log[-2000:]}"
    assert KEY_A not in log and KEY_B not in log


@pytest.mark.parametrize("level", ["info", "debug"])
def test_error_log_levels_that_log_keys_are_refused(nginx: None, tmp_path: Path, level: str) -> None:
    """At info nginx logs a repeated header with both values ("client sent duplicate header line"), Authorization
    included: the role refuses such levels before it writes anything."""
    gw = Gateway(tmp_path, upstream_port=free_port(), listen_port=free_port(), gateway_error_log_level=level)
    result = run_playbook(CONFIG_PLAYBOOK, gw.vars)
    assert result.rc != 0
    assert "gateway_error_log_level" in result.failure() and "notice" in result.failure(), result.failure()
    assert not (gw.config_dir / "nginx.conf").exists()


def test_valid_keys_reach_every_endpoint(gateway: Gateway) -> None:
    for key in (KEY_A, KEY_B):
        status, _unused, body = request(gateway.port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer(key))
        assert status == 200, body
        assert MODEL_NAME in [m["id"] for m in json.loads(body)["data"]]

    messages = [{"role": "user", "content": "Say hello."}]
    status, _unused, body = request(
        gateway.port,
        "POST",
        f"/{MODEL_NAME}/v1/chat/completions",
        headers=bearer(KEY_A),
        body={"messages": messages, "max_tokens": 16, "temperature": 0},
    )
    assert status == 200, body
    chat = json.loads(body)
    assert chat["choices"][0]["message"]["content"]
    prompt_tokens = chat["usage"]["prompt_tokens"]

    status, _unused, body = request(
        gateway.port,
        "POST",
        f"/{MODEL_NAME}/v1/completions",
        headers=bearer(KEY_B),
        body={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["text"]

    status, _unused, body = request(
        gateway.port, "POST", f"/{MODEL_NAME}/extras/tokenize", headers=bearer(KEY_A), body={"input": "hello world"}
    )
    assert status == 200, body
    tokens = json.loads(body)["tokens"]
    assert tokens

    status, _unused, body = request(
        gateway.port,
        "POST",
        f"/{MODEL_NAME}/extras/tokenize/count",
        headers=bearer(KEY_A),
        body={"input": "hello world"},
    )
    assert status == 200, body
    assert json.loads(body)["count"] == len(tokens)

    # The project's server counts whole chat requests exactly as the chat completion bills them.
    status, _unused, body = request(
        gateway.port, "POST", "/extras/tokenize/count", headers=bearer(KEY_A), body={"messages": messages}
    )
    assert status == 200, body
    assert json.loads(body)["count"] == prompt_tokens


CHATS = {
    "user": {"messages": [{"role": "user", "content": "Hi"}]},
    "system-user": {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primary colours."},
        ]
    },
    "multi-turn": {
        "messages": [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And of Spain? Écris en une phrase, s'il te plaît."},
        ]
    },
}


@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
def test_the_count_of_a_chat_request_is_its_usage_prompt_tokens(gateway: Gateway, chat: dict) -> None:
    status, _unused, body = request(
        gateway.port, "POST", f"/{MODEL_NAME}/extras/tokenize/count", headers=bearer(KEY_A), body=chat
    )
    assert status == 200, body
    count = json.loads(body)["count"]
    status, _unused, body = request(
        gateway.port,
        "POST",
        f"/{MODEL_NAME}/v1/chat/completions",
        headers=bearer(KEY_A),
        body={**chat, "max_tokens": 1, "temperature": 0},
    )
    assert status == 200, body
    assert count == json.loads(body)["usage"]["prompt_tokens"]


def test_tokens_go_there_and_back(gateway: Gateway) -> None:
    text = "Tokens, please: one two three. Naïve café ✓"
    status, _unused, body = request(
        gateway.port, "POST", f"/{MODEL_NAME}/extras/tokenize", headers=bearer(KEY_A), body={"input": text}
    )
    assert status == 200, body
    tokens = json.loads(body)["tokens"]
    assert tokens and all(isinstance(token, int) for token in tokens)
    status, _unused, body = request(
        gateway.port, "POST", f"/{MODEL_NAME}/extras/detokenize", headers=bearer(KEY_A), body={"tokens": tokens}
    )
    assert status == 200, body
    assert json.loads(body)["text"].strip() == text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/extras/tokenize/count", {"messages": [{"content": "Hi"}]}, "messages"),
        ("/extras/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/extras/detokenize", {"tokens": [-1]}, "tokens"),
        ("/extras/tokenize", {"input": 42}, "input"),
        ("/extras/tokenize/count", {"input": ["a"]}, "input"),
    ],
)
def test_a_bad_tokenizer_request_is_a_400_naming_the_field(gateway: Gateway, path: str, body: dict, param: str) -> None:
    status, _unused, answer = request(gateway.port, "POST", f"/{MODEL_NAME}{path}", headers=bearer(KEY_A), body=body)
    assert 400 <= status < 500, answer
    error = json.loads(answer)["error"]
    assert param in json.dumps(error), error
    assert gateway.alive()[0] == 200, "the backend is still serving"


REFUSED = {
    "stream not a boolean": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": {}}),
    "prompt not a string": ("/v1/completions", {"prompt": {"a": 1}, "max_tokens": 2}),
}


@pytest.mark.parametrize(("path", "body"), REFUSED.values(), ids=REFUSED.keys())
def test_a_request_the_backend_refuses_gets_an_openai_error(gateway: Gateway, path: str, body: dict) -> None:
    """Whichever backend refuses it, the client reads an OpenAI error: message, type, param and code."""
    status, headers, answer = request(gateway.port, "POST", f"/{MODEL_NAME}{path}", headers=bearer(KEY_A), body=body)
    assert 400 <= status < 500, answer
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = error_of(answer)
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str), error
    assert gateway.alive()[0] == 200, "the backend is still serving"


def test_metrics_on_their_own_port_without_a_key(gateway: Gateway) -> None:
    """The backend's Prometheus metrics (llama-server's names) on the metrics port; nothing else there, and the
    API port does not serve them."""
    status, headers, body = request(gateway.metrics_port, "GET", "/metrics")
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/plain"), headers
    text = body.decode()
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_processing"):
        assert f"\n{name} " in f"\n{text}", f"{name} in {text[:500]}"
    assert request(gateway.metrics_port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer(KEY_A))[0] == 404
    assert request(gateway.port, "GET", "/metrics", headers=bearer(KEY_A))[0] == 404


def test_chat_stream_arrives_as_server_sent_events(gateway: Gateway) -> None:
    chunks, done = stream(
        gateway.port,
        f"/{MODEL_NAME}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 32, "stream": True},
    )
    assert done
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


USAGE_ROUTES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me about the sea."}]}),
    "completion": ("/v1/completions", {"prompt": "The sea is"}),
}


@pytest.mark.parametrize("route", USAGE_ROUTES.values(), ids=USAGE_ROUTES.keys())
@pytest.mark.parametrize("max_tokens", [1, 12])
def test_a_stream_asked_for_usage_ends_with_the_usage_of_the_same_request(
    gateway: Gateway, route: tuple[str, dict], max_tokens: int
) -> None:
    """stream_options.include_usage, as the OpenAI API has it and billing gateways use it: one more chunk before
    [DONE], with no choices and the usage the same request gets without streaming; without it, no usage at all."""
    path, body = route
    body = {**body, "max_tokens": max_tokens, "temperature": 0, "seed": 3}
    status, _unused, answer = request(gateway.port, "POST", f"/{MODEL_NAME}{path}", headers=bearer(KEY_A), body=body)
    assert status == 200, answer
    usage = json.loads(answer)["usage"]
    usage = {key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}

    chunks, done = stream(
        gateway.port, f"/{MODEL_NAME}{path}", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert done
    last = chunks[-1]
    assert last.get("usage"), f"the last chunk carries the usage: {last}"
    assert {key: last["usage"][key] for key in usage} == usage
    assert all(chunk["choices"] for chunk in chunks[:-1]), "no usage-only chunk before the last"
    if last["choices"]:
        # llama-server's text completions put the usage into the chunk that finishes (its chat completions send a
        # chunk of their own, as OpenAI and llama-cpp-python do).
        assert (gateway.vars["gateway_backend"], path) == ("llama-server", "/v1/completions"), last
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all({key: chunk["usage"][key] for key in usage} == usage for chunk in chunks if chunk.get("usage"))

    chunks, done = stream(gateway.port, f"/{MODEL_NAME}{path}", {**body, "stream": True})
    assert done
    assert all(chunk["choices"] for chunk in chunks), "no usage chunk unless asked"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    if gateway.vars["gateway_backend"] == "llama-cpp-python":
        assert all(not chunk.get("usage") for chunk in chunks), "no usage at all unless asked"


CONCURRENT = 8
TOPICS = ["the sea", "a city", "winter", "a cat", "music", "bread", "a river", "the moon"]


def streamed_answer(port: int, topic: str) -> dict:
    """One greedy, seeded chat stream: its text, finish reason, [DONE], and when it started and ended."""
    body = {
        "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
        "max_tokens": 24,
        "temperature": 0,
        "seed": 42,
        "stream": True,
    }
    started = time.monotonic()
    chunks, done = stream(port, f"/{MODEL_NAME}/v1/chat/completions", body)
    return {
        "text": "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks),
        "finish_reason": chunks[-1]["choices"][0]["finish_reason"] if chunks else None,
        "done": done,
        "started": started,
        "ended": time.monotonic(),
    }


def test_concurrent_streams_through_the_gateway_are_complete_and_unchanged(gateway: Gateway) -> None:
    """8 streams at once through nginx to the real server: none is cut, each says what it says alone."""
    alone = {topic: streamed_answer(gateway.port, topic) for topic in TOPICS[:CONCURRENT]}
    for topic, answer in alone.items():
        assert answer["done"] and answer["finish_reason"] in ("stop", "length") and answer["text"], (topic, answer)

    barrier = threading.Barrier(CONCURRENT)
    together: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(topic: str) -> None:
        try:
            barrier.wait(30)
            together[topic] = streamed_answer(gateway.port, topic)
        except BaseException as exc:  # reported below, with the topic
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(topic,)) for topic in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    assert set(together) == set(alone)
    # All 8 were in flight at once: the last to start started before the first to end ended.
    assert max(a["started"] for a in together.values()) < min(a["ended"] for a in together.values())
    # Each stream is whole and is its own request's answer: it begins as that request alone does. Not the whole text:
    # greedy decoding is exact only for the same floating-point sums, and they change with what the server already
    # holds (llama-cpp-python reuses the prompt prefix the previous request left in its cache, and the order of the
    # 8 differs from the order alone) and with the batch (llama-server decodes the 8 together), so a near-tie late in
    # an answer can go the other way ("...realm, teeming with life" once, "...realm, where the boundaries" another).
    for topic, answer in together.items():
        assert answer["done"], f"{topic}: no [DONE], the stream was cut"
        assert answer["finish_reason"] in ("stop", "length"), (topic, answer)
        assert answer["text"][:24] == alone[topic]["text"][:24], (topic, answer["text"], alone[topic]["text"])
    took = max(a["ended"] for a in together.values()) - min(a["started"] for a in together.values())
    print(f"{CONCURRENT} concurrent streams through the gateway complete and identical in {took:.1f} s")


def stream(port: int, path: str, body: dict, key: str = KEY_A, on_first=None) -> tuple[list[dict], bool]:
    """POST a streamed request; return its data chunks and whether [DONE] arrived."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = json.dumps(body).encode()
    conn.request(
        "POST", path, body=data, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    chunks: list[dict] = []
    done = False
    for event in stream_events(iter(resp.readline, b"")):
        if event == "[DONE]":
            done = True
            break
        chunks.append(event)
        if on_first and len(chunks) == 1:
            on_first()
    conn.close()
    return chunks, done


# --- routing and what is forwarded


@pytest.mark.parametrize(
    ("method", "sent", "forwarded"),
    [
        ("GET", f"/{MODEL_NAME}/v1/models", "/v1/models"),
        ("GET", f"/{MODEL_NAME}/v1/models/", "/v1/models"),
        ("GET", "/v1/models", "/v1/models"),
        ("GET", "/v1/models//", "/v1/models"),
        ("POST", f"/{MODEL_NAME}/v1/chat/completions", "/v1/chat/completions"),
        ("POST", f"/{MODEL_NAME}/extras/tokenize/count", "/extras/tokenize/count"),
        ("POST", "/extras/detokenize/", "/extras/detokenize"),
    ],
)
def test_routing(recorded, method: str, sent: str, forwarded: str) -> None:
    gw, upstream = recorded
    body = {} if method == "POST" else None
    status, _unused, _unused = request(gw.port, method, sent, headers=bearer(KEY_A), body=body)
    assert status == 200
    assert upstream.seen[-1]["path"] == forwarded


@pytest.mark.parametrize(
    ("method", "sent", "status", "code"),
    [
        ("GET", f"/{MODEL_NAME}/v1/models?limit=1", 400, "query_string_not_allowed"),
        ("GET", f"/{MODEL_NAME}/v1/model", 404, "unknown_url"),
        ("GET", f"/{MODEL_NAME}/v1/models/smollm2", 404, "unknown_url"),
        ("GET", "/other/v1/models", 404, "unknown_url"),
        ("GET", "/docs", 404, "unknown_url"),
        ("GET", "/openapi.json", 404, "unknown_url"),
        ("GET", f"/{MODEL_NAME}//v1/models", 404, "unknown_url"),
        ("GET", f"/{MODEL_NAME}/v1/%6Dodels", 404, "unknown_url"),
        ("POST", f"/{MODEL_NAME}/v1/models", 405, "method_not_allowed"),
        ("HEAD", f"/{MODEL_NAME}/v1/models", 405, None),
        ("GET", f"/{MODEL_NAME}/v1/chat/completions", 405, "method_not_allowed"),
        ("PUT", "/extras/tokenize", 405, "method_not_allowed"),
    ],
)
def test_what_the_gateway_does_not_route_never_reaches_the_backend(
    recorded, method: str, sent: str, status: int, code: str | None
) -> None:
    gw, upstream = recorded
    before = len(upstream.seen)
    got, headers, body = request(gw.port, method, sent, headers=bearer(KEY_A))
    assert got == status, body
    if method != "HEAD":
        error = json.loads(body)["error"]
        assert set(error) >= ERROR_KEYS
        assert error["code"] == code
    if status == 405:
        assert headers["allow"] in ("GET", "POST")
    assert len(upstream.seen) == before


@pytest.mark.parametrize(
    "path", [f"/{MODEL_NAME}/v1/models", f"/{MODEL_NAME}/v1/models/", "/v1/models", f"/{MODEL_NAME}/extras/tokenize"]
)
def test_routing_to_the_real_backend(gateway: Gateway, path: str) -> None:
    method, body = ("POST", {"input": "hi"}) if "tokenize" in path else ("GET", None)
    status, _unused, payload = request(gateway.port, method, path, headers=bearer(KEY_A), body=body)
    assert status == 200, payload


def test_authorization_is_neither_forwarded_nor_logged(recorded) -> None:
    gw, upstream = recorded
    status, _unused, _unused = request(
        gw.port, "POST", f"/{MODEL_NAME}/v1/chat/completions", headers=bearer(KEY_A), body={}
    )
    assert status == 200
    headers = upstream.seen[-1]["headers"]
    assert "authorization" not in headers
    assert headers.get("x-request-id")
    time.sleep(0.2)
    log = gw.access_log.read_text()
    assert KEY_A not in log
    assert "Bearer" not in log
    entries = [json.loads(line) for line in log.splitlines()]
    assert entries[-1]["path"] == f"/{MODEL_NAME}/v1/chat/completions"
    assert entries[-1]["status"] == 200


def test_server_version_is_not_disclosed_and_body_size_is_limited(recorded) -> None:
    gw, _unused = recorded
    _unused, headers, _unused = request(gw.port, "GET", "/healthz")
    assert headers["server"] == "nginx"
    big = {"prompt": "x" * (11 * 1024 * 1024)}
    status, _unused, body = request(gw.port, "POST", f"/{MODEL_NAME}/v1/completions", headers=bearer(KEY_A), body=big)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


# --- key rotation


def test_keys_rotate_without_reload(recorded) -> None:
    gw, _unused = recorded
    master = gw.proc.pid
    key_c = "sk-llmpods-" + uuid.uuid4().hex
    assert_unauthorized(*request(gw.port, "GET", "/v1/models", headers=bearer(key_c)))

    write_keys(gw.keys_file, [KEY_A, key_c])  # add the new key: it works within a second
    started = time.monotonic()
    wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(key_c))[0] == 200, 10, 0.05, "new key")
    added = time.monotonic() - started
    assert request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A))[0] == 200

    write_keys(gw.keys_file, [key_c])  # then retire the old one: refused within a second
    started = time.monotonic()
    wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A))[0] == 401, 10, 0.05, "old key gone")
    removed = time.monotonic() - started
    assert_unauthorized(*request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A)))
    assert request(gw.port, "GET", "/v1/models", headers=bearer(key_c))[0] == 200
    assert gw.proc.pid == master and gw.proc.poll() is None
    assert "reconfiguring" not in gw.error_log.read_text()
    # The index is checked once a second; a generous bound for a busy host (bench/ has no figure for this).
    assert added < 5 and removed < 5, (added, removed)
    print(f"key added: works after {added:.2f} s; key removed: refused after {removed:.2f} s")

    write_keys(gw.keys_file, [KEY_A])
    wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A))[0] == 200, 10, 0.05, "key A back")


# --- readiness


def test_healthz_needs_neither_key_nor_model(recorded) -> None:
    gw, _unused = recorded
    status, _unused, body = request(gw.port, "GET", "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}


def test_readiness_does_not_wait_on_a_running_generation(gateway: Gateway, backend: Backend) -> None:
    assert gateway.alive()[0] == 200  # latched
    streaming = threading.Event()
    result: dict = {}

    def generate() -> None:
        # Ban the end-of-sequence tokens so the model writes all 300 tokens; greedy and seeded, so the text (and
        # with it the chunking) is the same on every run.
        body = {
            "prompt": "Once upon a time",
            "max_tokens": 300,
            "stream": True,
            "temperature": 0,
            "seed": 7,
            "logit_bias": {"0": -100, "1": -100, "2": -100},
        }
        result["chunks"], result["done"] = stream(
            gateway.port, f"/{MODEL_NAME}/v1/completions", body, on_first=streaming.set
        )

    thread = threading.Thread(target=generate)
    thread.start()
    assert streaming.wait(60), "the stream started"
    streamed_from = time.monotonic()
    answers = []
    while thread.is_alive():
        start = time.monotonic()
        status, body = gateway.alive()
        answers.append((status, time.monotonic() - start, body))
        time.sleep(0.05)
    thread.join()
    streamed = time.monotonic() - streamed_from

    assert len(answers) >= 3, f"readiness was checked while the stream ran: {answers}"
    assert all(status == 200 for status, _unused, _unused in answers), answers
    # Relative, not absolute: an answer that waited on the generation would take about as long as the stream.
    slowest = max(elapsed for _unused, elapsed, _unused in answers)
    assert slowest < streamed / 3, f"slowest readiness answer {slowest:.3f} s during a {streamed:.1f} s stream"
    chunks = result["chunks"]
    assert result["done"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    tokens = [c for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert len(tokens) == 300, "one chunk per token, none lost"
    print(f"{len(answers)} readiness answers during a 300-token stream, slowest {slowest * 1e3:.0f} ms")


@pytest.mark.parametrize("kind", BACKENDS)
def test_readiness_follows_the_backend(nginx: None, demo_model: Path, tmp_path: Path, kind: str) -> None:
    need(*backend_available(kind))
    port = free_port()
    gw = Gateway(tmp_path / "gw", upstream_port=port, listen_port=free_port(), gateway_backend=kind)
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)
    gw.start()
    backend = Backend(demo_model, port, tmp_path / "backend.log", kind=kind)
    try:
        status, body = gw.alive()
        assert (status, body["status"]) == (503, "loading"), body
        assert not (gw.run_dir / "llmpods-ready").exists()

        backend.start()
        started = time.monotonic()
        wait_for(lambda: gw.alive()[0] == 200, 180, 0.2, "/alive 200 after the backend started")
        assert gw.alive() == (200, {"status": "ready", "model": MODEL_NAME})
        print(f"ready {time.monotonic() - started:.1f} s after the backend started")

        backend.kill()
        killed = time.monotonic()
        wait_for(lambda: gw.alive(timeout=5)[0] == 503, 30, 0.05, "/alive 503 after the backend died")
        print(f"/alive 503 {time.monotonic() - killed:.2f} s after the backend died")
        status, body = gw.alive()
        assert status == 503
        assert body["status"] in ("unavailable", "loading")

        backend.start()
        wait_for(lambda: gw.alive()[0] == 200, 180, 0.2, "/alive 200 after the backend restarted")
    finally:
        backend.kill()
        gw.stop()


def test_readiness_stays_503_for_a_model_the_backend_does_not_serve(
    nginx: None, backend: Backend, tmp_path: Path
) -> None:
    gw = Gateway(
        tmp_path, upstream_port=backend.port, listen_port=free_port(), model="othermodel", gateway_backend=backend.kind
    )
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)
    gw.start()
    try:
        for _unused in range(5):
            status, body = gw.alive()
            assert status == 503
            assert body["status"] == "model_not_listed"
            assert MODEL_NAME in body["listed"]
            time.sleep(0.2)
    finally:
        gw.stop()


def test_the_model_ready_stub_answers_as_the_gateway_does(recorded, nginx: None, tmp_path: Path) -> None:
    """The scripted gateway of the model_ready unit tests (helpers/gateway_stub.py) against the real one: same
    statuses, same bodies, the error fields too, so those tests stand for what the module meets."""
    gw, _unused = recorded
    status, body = gw.alive()
    assert (status, body) == (stub.alive().status, stub.alive().body)

    status, _unused, payload = request(gw.port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer("sk-wrong"))
    real, scripted = json.loads(payload), stub.unauthorized().body
    assert status == stub.unauthorized().status
    assert set(real["error"]) == set(scripted["error"]), (real, scripted)
    assert {k: real["error"][k] for k in ("type", "code", "param")} == {
        k: scripted["error"][k] for k in ("type", "code", "param")
    }

    loading = Gateway(tmp_path / "loading", upstream_port=free_port(), listen_port=free_port())
    write_keys(loading.keys_file, [KEY_A])
    loading.render(run_playbook)
    loading.start()
    try:
        status, body = loading.alive()
    finally:
        loading.stop()
    assert status == stub.loading().status
    assert set(body) == set(stub.loading().body), (body, stub.loading().body)
    assert {k: body[k] for k in ("status", "model")} == {k: stub.loading().body[k] for k in ("status", "model")}


@pytest.mark.parametrize(
    ("scheme", "spaces", "newline"),
    [("bearer", " ", "\n"), ("BEARER", "   ", "\n"), ("Bearer", " ", "\r\n")],
    ids=["lower-case scheme", "several spaces", "CRLF keys file"],
)
def test_valid_keys_in_the_forms_clients_send(recorded, scheme: str, spaces: str, newline: str) -> None:
    gw, _unused = recorded
    key = "sk-llmpods-" + uuid.uuid4().hex
    tmp = gw.keys_file.with_name("api-keys.new")
    tmp.write_bytes(newline.join(["# keys", key, KEY_A, ""]).encode())
    tmp.replace(gw.keys_file)
    try:
        headers = [("Authorization", f"{scheme}{spaces}{key}")]
        wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=headers)[0] == 200, 10, 0.05, "key accepted")
        assert request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A))[0] == 200, "the next line's key too"
    finally:
        write_keys(gw.keys_file, [KEY_A])
    wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(key))[0] == 401, 10, 0.05, "key gone")


def test_api_calls_get_a_json_502_while_the_backend_is_down(nginx: None, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, upstream_port=free_port(), listen_port=free_port())  # nothing listens upstream
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)
    gw.start()
    try:
        for method, path, body in [
            ("GET", f"/{MODEL_NAME}/v1/models", None),
            ("POST", f"/{MODEL_NAME}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ]:
            status, headers, payload = request(gw.port, method, path, headers=bearer(KEY_A), body=body)
            assert status == 502, payload
            assert headers["content-type"].startswith("application/json")
            error = json.loads(payload)["error"]
            assert set(error) >= ERROR_KEYS
            assert (error["type"], error["code"]) == ("server_error", "backend_unavailable"), error
            assert MODEL_NAME in error["message"]
    finally:
        gw.stop()


@pytest.mark.parametrize("how", ["missing", "unreadable"])
def test_no_keys_file_means_no_key_and_not_ready(recorded, how: str) -> None:
    gw, upstream = recorded
    before = len(upstream.seen)
    gw.keys_file.unlink()
    if how == "unreadable":
        gw.keys_file.mkdir()  # a directory where the file should be: unreadable as a file, even for root
    try:
        wait_for(
            lambda: request(gw.port, "GET", "/v1/models", headers=bearer(KEY_A))[0] == 401, 10, 0.05, "key refused"
        )
        status, body = gw.alive()
        assert (status, body["status"]) == (503, "no_keys"), body
        assert str(gw.keys_file) in body["message"]
        assert len(upstream.seen) == before, "nothing reached the backend"
    finally:
        if gw.keys_file.is_dir():
            gw.keys_file.rmdir()
        write_keys(gw.keys_file, [KEY_A])
    wait_for(lambda: gw.alive()[0] == 200, 10, 0.05, "ready again")


def test_readiness_is_503_without_keys(recorded) -> None:
    gw, _unused = recorded
    write_keys(gw.keys_file, [])
    try:
        status, body = gw.alive()
        assert (status, body["status"]) == (503, "no_keys")
    finally:
        write_keys(gw.keys_file, [KEY_A])
    assert gw.alive()[0] == 200


# --- the image


@pytest.fixture(scope="module")
def gateway_image(docker_engine: None) -> str:
    tag = "test-" + uuid.uuid4().hex[:8]
    result = run_playbook(IMAGE_PLAYBOOK, {"gateway_image_tag": tag})
    assert result.rc == 0, result.failure()
    ref = f"llmpods/gateway:{tag}"
    yield ref
    subprocess.run(["docker", "rmi", ref], capture_output=True, check=False)


def test_image_runs_the_rendered_config_as_uid_10002(gateway_image: str, backend: Backend, tmp_path: Path) -> None:
    image = json.loads(
        subprocess.run(["docker", "image", "inspect", gateway_image], capture_output=True, check=True).stdout
    )
    config = image[0]["Config"]
    assert config["User"] == "10002:10002"
    assert config["Entrypoint"] == ["nginx"]
    assert config["Labels"]["org.opencontainers.image.version"]

    listen = free_port()
    gw = Gateway(tmp_path, upstream_port=backend.port, listen_port=listen)
    # Container paths: the role's defaults, as in the pod; validated inside the image.
    gw.vars.update(
        gateway_run_dir="/tmp",
        gateway_keys_file="/etc/llmpods/keys/api-keys",
        gateway_user="",
        gateway_validate="image",
        gateway_image_tag=gateway_image.split(":")[1],
    )
    write_keys(gw.keys_file, [KEY_A])
    gw.render(run_playbook)

    mounts = [
        f"--volume={gw.config_dir}:/etc/llmpods/gateway:ro",
        f"--volume={gw.keys_file}:/etc/llmpods/keys/api-keys:ro",
    ]
    test = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "--tmpfs=/tmp", *mounts, gateway_image,
         "-t", "-c", "/etc/llmpods/gateway/nginx.conf"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr
    assert "test is successful" in test.stderr

    name = "llmpods-gateway-test-" + uuid.uuid4().hex[:8]
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--network=host", "--read-only", "--tmpfs=/tmp", "--cap-drop=ALL",
         *mounts, gateway_image],
        capture_output=True,
        check=True,
    )  # fmt: skip
    try:
        wait_for(lambda: request(listen, "GET", "/healthz", timeout=2)[0] == 200, 20, what="container /healthz")
        wait_for(lambda: request(listen, "GET", "/alive", timeout=5)[0] == 200, 30, what="container /alive")
        status, _unused, body = request(listen, "GET", f"/{MODEL_NAME}/v1/models/", headers=bearer(KEY_A))
        assert status == 200, body
        assert_unauthorized(*request(listen, "GET", f"/{MODEL_NAME}/v1/models"))
        top = subprocess.run(["docker", "top", name], capture_output=True, text=True, check=True)
        uids = {line.split()[0] for line in top.stdout.splitlines()[1:]}
        assert uids == {"10002"}, top.stdout
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=True)
        assert KEY_A not in logs.stdout + logs.stderr
        assert '"status":200' in logs.stdout, "JSON access log on stdout"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
