"""Bad input never costs anyone else (issue 12), as a client sees it: real nginx running the config that
roles/gateway renders, in front of each real backend serving the demo model (llama-cpp-python's llmpods_server,
started through helpers.gateway_fault_server, which can make one streamed request fail mid-way; and llama-server),
and, where the test needs a backend that misbehaves on purpose, stand-in upstreams. Every test that takes
``backend`` or ``gateway`` runs against both backends, but for the two that need the fault server.

Each refusal must be an OpenAI-style JSON error with a 4xx status, never a 5xx, an HTML page or a traceback
(helpers.gateway.error_of checks that); one client's bad request never changes another client's answer; no
secret from a URL, a header or a body reaches a log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, need, need_module, run_playbook
from helpers.gateway import (
    BACKENDS,
    MODEL_NAME,
    Backend,
    Gateway,
    MisbehavingUpstream,
    Recorder,
    backend_available,
    bearer,
    error_of,
    nginx_ok,
    raw_request,
    request,
    wait_for,
    write_keys,
)
from helpers.gateway_fault_server import REQUEST_FAULT, SERVER_FAULT
from helpers.sse import data_events

pytestmark = pytest.mark.slow

KEY = "sk-llmpods-" + uuid.uuid4().hex
SECRET = "sk-secret-" + uuid.uuid4().hex  # must never reach a log
CHAT = f"/{MODEL_NAME}/v1/chat/completions"
HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def nginx() -> None:
    need(nginx_ok(), "nginx with the njs module (Debian: nginx-light libnginx-mod-http-js)")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(demo_model: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    need(*backend_available(request.param))
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    proc = Backend(demo_model, free_port(), log, module="helpers.gateway_fault_server", kind=request.param).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def start_gateway(root: Path, upstream_port: int, **extra) -> Gateway:
    gw = Gateway(root, upstream_port=upstream_port, listen_port=free_port(), **extra)
    write_keys(gw.keys_file, [KEY])
    gw.render(run_playbook)
    return gw.start()


@pytest.fixture(scope="module")
def gateway(nginx: None, backend: Backend, tmp_path_factory: pytest.TempPathFactory):
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), backend.port, gateway_backend=backend.kind)
    try:
        wait_for(lambda: gw.alive()[0] == 200, 30, what="gateway /alive 200")
        yield gw
    finally:
        gw.stop()


def post(port: int, path: str, body: bytes | dict, content_type: str = "application/json", key: str = KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    return raw_request(port, head.encode() + data, timeout=120)


def events(port: int, path: str, body: dict, key: str = KEY) -> tuple[int, dict[str, str], list]:
    """POST a streamed request; the status, headers and its events (JSON objects, and "[DONE]")."""
    status, headers, data = post(port, path, body, key=key)
    if status != 200:
        return status, headers, [data]
    return status, headers, data_events(data.decode().splitlines())


# For a test that makes a stream fail on purpose: only the fault server (on llama-cpp-python) can.
FAULT_SERVER = pytest.mark.parametrize("backend", ["llama-cpp-python"], indirect=True)


def answers_correctly(port: int) -> None:
    status, _unused, body = post(port, f"/{MODEL_NAME}/extras/tokenize", {"input": "hello world"})
    assert status == 200, body
    assert json.loads(body)["tokens"]


# --- 1. every refusal is a JSON error with a 4xx status


REQUEST_LINES = {
    "encoded ..": (b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "NUL in the path": (b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "CONNECT": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "HTTP/3.0": (b"GET /v1/models HTTP/3.0\r\nHost: gw\r\n\r\n", 400),
    "lower-case method": (b"get /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    "TRACE": (b"TRACE /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n", 405),
    "unknown Transfer-Encoding": (b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    "Content-Length and chunked": (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "two Content-Length": (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
    ),
    "negative Content-Length": (b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n", 400),
    "two Host headers": (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "HTTP/1.1 without Host": (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
    "header line without a colon (ignored)": (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nnonsense\r\n\r\n", 401),
    "URI too long": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
    "header too large": (b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 400),
    "absolute URI": (b"GET http://elsewhere/v1/models HTTP/1.1\r\nHost: gw\r\n\r\n", 401),
}


@pytest.mark.parametrize(("data", "status"), REQUEST_LINES.values(), ids=REQUEST_LINES.keys())
def test_a_request_nginx_cannot_parse_gets_a_json_4xx(gateway: Gateway, data: bytes, status: int) -> None:
    got, headers, body = raw_request(gateway.port, data)
    assert got == status, body[:300]
    assert headers.get("content-type", "").startswith("application/json"), headers
    error_of(body)
    answers_correctly(gateway.port)


BODIES = {
    "not JSON": (CHAT, "application/json", b"{bad", 400, "invalid_json"),
    "not UTF-8": (CHAT, "application/json", b'{"messages": "\xff\xfe"}', 400, "invalid_request"),
    "nested too deeply": (CHAT, "application/json", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_request"),
    "messages a string": (CHAT, "application/json", b'{"messages": "hi"}', 422, "invalid_type"),
    "max_tokens lots": (
        CHAT,
        "application/json",
        json.dumps({"messages": HI, "max_tokens": "lots"}).encode(),
        422,
        "invalid_type",
    ),
    "top_p out of range": (CHAT, "application/json", json.dumps({"messages": HI, "top_p": 5}).encode(), 422, None),
    "no input": (f"/{MODEL_NAME}/extras/tokenize", "application/json", b"{}", 422, "missing_required_parameter"),
    "a list": (CHAT, "application/json", b"[1, 2]", 422, None),
    "null": (CHAT, "application/json", b"null", 422, None),
    "empty body": (CHAT, "application/json", b"", 422, None),
    "text/plain": (CHAT, "text/plain", json.dumps({"messages": HI}).encode(), 400, "invalid_content_type"),
    "no Content-Type": (CHAT, "", json.dumps({"messages": HI}).encode(), 400, "invalid_content_type"),
    "form-encoded (curl -d)": (
        CHAT,
        "application/x-www-form-urlencoded",
        json.dumps({"messages": HI}).encode(),
        400,
        "invalid_content_type",
    ),
    "content parts": (
        CHAT,
        "application/json",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        400,
        "invalid_request",
    ),
    "logit_bias key not a token id": (
        CHAT,
        "application/json",
        json.dumps({"messages": HI, "max_tokens": 2, "logit_bias": {"abc": 1}}).encode(),
        400,
        "invalid_value",
    ),
    "grammar llama.cpp cannot parse": (
        CHAT,
        "application/json",
        json.dumps({"messages": HI, "max_tokens": 2, "grammar": 'root ::= root "a"'}).encode(),
        400,
        "invalid_grammar",
    ),
    "two prompts": (
        f"/{MODEL_NAME}/v1/completions",
        "application/json",
        json.dumps({"prompt": ["a", "b"], "max_tokens": 2}).encode(),
        400,
        "invalid_value",
    ),
    "empty prompt": (
        f"/{MODEL_NAME}/v1/completions",
        "application/json",
        json.dumps({"prompt": "", "max_tokens": 2}).encode(),
        400,
        "invalid_value",
    ),
    "token id below the vocabulary": (
        f"/{MODEL_NAME}/extras/detokenize",
        "application/json",
        b'{"tokens": [-1]}',
        400,
        "invalid_value",
    ),
    "token id above the vocabulary": (
        f"/{MODEL_NAME}/extras/detokenize",
        "application/json",
        b'{"tokens": [1099511627776]}',
        400,
        "invalid_value",
    ),
    "lone surrogate": (f"/{MODEL_NAME}/extras/tokenize", "application/json", b'{"input": "\\udc80"}', 400, None),
    "embeddings from a chat model": (
        f"/{MODEL_NAME}/v1/embeddings",
        "application/json",
        b'{"input": "hi"}',
        400,
        "embeddings_not_supported",
    ),
}


# Where llama-server answers otherwise: its own status and code, or a 200 for what it takes. It reads a list of
# prompts as one choice each, answers an empty prompt, clamps top_p and ignores a logit_bias key that is no token.
LLAMA_SERVER_ANSWERS = {
    "not UTF-8": (400, "invalid_json"),
    "nested too deeply": (400, "invalid_value"),
    "messages a string": (400, "invalid_value"),
    "max_tokens lots": (400, "invalid_value"),
    "top_p out of range": (200, None),
    "no input": (400, "invalid_value"),
    "a list": (400, "invalid_value"),
    "null": (400, "invalid_value"),
    "empty body": (400, "invalid_json"),
    "content parts": (400, "invalid_value"),
    "logit_bias key not a token id": (200, None),
    "two prompts": (200, None),
    "empty prompt": (200, None),
}


@pytest.mark.parametrize("name", BODIES)
def test_a_body_the_server_cannot_use_gets_a_json_4xx(gateway: Gateway, backend: Backend, name: str) -> None:
    path, content_type, data, status, code = BODIES[name]
    if backend.kind == "llama-server":
        status, code = LLAMA_SERVER_ANSWERS.get(name, (status, code))
    got, _unused, body = post(gateway.port, path, data if isinstance(data, bytes) else data.encode(), content_type)
    assert got == status, body[:500]
    if status == 200:
        assert json.loads(body)["choices"], body[:500]
        return
    error = error_of(body)
    if code is not None:
        assert error["code"] == code, error
    answers_correctly(gateway.port)


def test_body_too_large_is_a_json_413_with_or_without_a_length(gateway: Gateway) -> None:
    big = json.dumps({"prompt": "x" * (11 * 1024 * 1024)}).encode()
    status, _unused, body = post(gateway.port, f"/{MODEL_NAME}/v1/completions", big)
    assert status == 413
    assert error_of(body)["code"] == "request_too_large"

    head = (
        f"POST /{MODEL_NAME}/v1/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"x" * (1024 * 1024)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _unused in range(11)) + b"0\r\n\r\n"
    status, _unused, body = raw_request(gateway.port, head + chunks)
    assert status == 413
    assert error_of(body)["code"] == "request_too_large"


def test_http_1_0_without_host_reaches_the_backend(gateway: Gateway) -> None:
    data = f"GET /{MODEL_NAME}/v1/models HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    status, _unused, body = raw_request(gateway.port, data)
    assert status == 200, body
    assert MODEL_NAME in [m["id"] for m in json.loads(body)["data"]]


# --- 2. one client's bad request never changes another client's answer


def test_bad_requests_never_cost_a_concurrent_client(gateway: Gateway, backend: Backend) -> None:
    bad = [
        (CHAT, b"{bad"),
        (CHAT, json.dumps({"messages": HI, "max_tokens": "lots"}).encode()),
        (CHAT, json.dumps({"messages": HI, "max_tokens": 2, "grammar": "root ::= ("}).encode()),
        (f"/{MODEL_NAME}/extras/detokenize", b'{"tokens": [99999999]}'),
        (f"/{MODEL_NAME}/extras/tokenize", b'{"input": "\\udc80"}'),
    ]
    if backend.kind == "llama-cpp-python":  # llama-server ignores a key that is no token id
        bad.append((CHAT, json.dumps({"messages": HI, "max_tokens": 2, "logit_bias": {"abc": 1}}).encode()))
    stop = threading.Event()
    refused: list[int] = []

    def hostile() -> None:
        while not stop.is_set():
            for path, data in bad:
                refused.append(post(gateway.port, path, data)[0])

    thread = threading.Thread(target=hostile)
    thread.start()
    answers = []
    try:
        for _unused in range(60):
            status, _unused, body = post(gateway.port, f"/{MODEL_NAME}/extras/tokenize", {"input": "hello world"})
            answers.append((status, body))
    finally:
        stop.set()
        thread.join()
    assert all(status == 200 for status, _unused in answers), [a for a in answers if a[0] != 200][:3]
    assert refused and all(400 <= status < 500 for status in refused), sorted(set(refused))
    print(f"{len(answers)} valid requests answered while {len(refused)} bad ones were refused")


@pytest.fixture
def misbehaving(nginx: None, tmp_path: Path):
    def start(mode: str) -> tuple[Gateway, MisbehavingUpstream]:
        upstream = MisbehavingUpstream(mode).start()
        started.append(upstream)
        # One worker: every request sees the same idle upstream connections.
        gw = start_gateway(tmp_path / mode, upstream.port, gateway_worker_processes="1")
        gateways.append(gw)
        return gw, upstream

    started: list[MisbehavingUpstream] = []
    gateways: list[Gateway] = []
    yield start
    for gw in gateways:
        gw.stop()
    for upstream in started:
        upstream.stop()


def test_a_connection_the_backend_drops_after_an_error_is_never_reused(misbehaving) -> None:
    gw, _upstream = misbehaving("close_after_500")
    failed, answered = [], []
    for _unused in range(100):
        status, _unused, body = post(gw.port, CHAT, {"fail": True})
        failed.append((status, error_of(body)["type"]))
        answered.append(post(gw.port, CHAT, {"fine": True})[0])
    assert set(failed) == {(500, "server_error")}
    assert set(answered) == {200}, f"{answered.count(502)} of 100 valid requests got 502"


def test_only_a_request_that_is_safe_to_repeat_is_tried_again(misbehaving) -> None:
    gw, upstream = misbehaving("stale")
    first = post(gw.port, CHAT, {"n": 1})
    second = post(gw.port, CHAT, {"n": 2})  # finds the first one's connection closed: a POST may already be
    assert first[0] == 200  # generating, so it is never sent twice
    assert second[0] == 502
    assert error_of(second[2])["code"] == "backend_unavailable"
    assert upstream.seen == [("POST", "/v1/chat/completions")] * 2

    upstream.seen.clear()
    for _unused in range(2):  # the same on a GET: sent again on a new connection
        assert request(gw.port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer(KEY))[0] == 200
    assert upstream.seen == [("GET", "/v1/models")] * 3


# --- 3. streams fail like the same request without streaming


def test_a_stream_that_fails_before_its_first_token_answers_like_without_streaming(gateway: Gateway) -> None:
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    cases = [
        (CHAT, {"messages": long_prompt, "max_tokens": 16}, "context_length_exceeded"),
        (f"/{MODEL_NAME}/v1/completions", {"prompt": "word " * 3000, "max_tokens": 16}, "context_length_exceeded"),
        (CHAT, {"messages": HI, "max_tokens": 4, "grammar": 'root ::= root "a"'}, "invalid_grammar"),
    ]
    for path, body, code in cases:
        plain = post(gateway.port, path, body)
        streamed = post(gateway.port, path, {**body, "stream": True})
        assert plain[0] == streamed[0] == 400, (plain, streamed)
        assert streamed[1]["content-type"].startswith("application/json")
        assert json.loads(streamed[2]) == json.loads(plain[2])
        assert error_of(streamed[2])["code"] == code


@FAULT_SERVER
@pytest.mark.parametrize(
    ("marker", "error_type"), [(SERVER_FAULT, "server_error"), (REQUEST_FAULT, "invalid_request_error")]
)
def test_a_stream_that_fails_after_its_first_token_ends_with_an_error_event(
    gateway: Gateway, marker: str, error_type: str
) -> None:
    body = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 8, "stream": True, "stop": [marker]}
    status, headers, found = events(gateway.port, CHAT, body)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert found[-1] == "[DONE]", found
    chunks, error = found[:-2], found[-2]
    assert chunks and all("choices" in chunk for chunk in chunks)
    assert error["error"]["type"] == error_type, error
    assert "Traceback" not in json.dumps(error)
    if error_type == "server_error":
        assert SECRET not in json.dumps(error), "a server failure does not echo the request"
    answers_correctly(gateway.port)


@FAULT_SERVER
def test_the_openai_sdk_raises_both_stream_failures(gateway: Gateway) -> None:
    openai = need_module("openai", "the OpenAI SDK (openai)")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/{MODEL_NAME}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=16, stream=True
        )
    assert refused.value.code == "context_length_exceeded"
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=HI, max_tokens=8, stream=True, stop=[SERVER_FAULT]
    )
    received = []
    with pytest.raises(openai.APIError, match="inference server failed"):
        for chunk in stream:
            received.append(chunk)
    assert received, "the chunks before the failure arrived"


def test_a_stream_the_client_abandons_frees_the_model(gateway: Gateway) -> None:
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": {"0": -100, "1": -100, "2": -100},
    }
    data = json.dumps(body).encode()
    head = (
        f"POST /{MODEL_NAME}/v1/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(head + data)
        received = b""
        while b"data: " not in received and (chunk := sock.recv(65536)):
            received += chunk
        assert b"data: " in received, "the stream started"
        assert generating(gateway) == 1
    started = time.monotonic()
    answers_correctly(gateway.port)  # llama-cpp-python: waits on the model lock
    wait_for(lambda: generating(gateway) == 0, 20, what="the abandoned generation stopped")
    assert time.monotonic() - started < 20


def generating(gateway: Gateway) -> float:
    """Requests the backend is generating for, from its metrics (llamacpp:requests_processing)."""
    status, _unused, body = request(gateway.metrics_port, "GET", "/metrics")
    assert status == 200, body[:300]
    for line in body.decode().splitlines():
        if line.startswith("llamacpp:requests_processing "):
            return float(line.split()[1])
    raise AssertionError("no llamacpp:requests_processing in the metrics")


# --- 4. endpoints without a key take no body and forward none, and only their methods


@pytest.mark.parametrize("path", ["/alive", "/healthz"])
def test_health_endpoints_take_no_body_and_only_get(nginx: None, tmp_path: Path, path: str) -> None:
    upstream = Recorder(free_port()).start()
    gw = start_gateway(tmp_path, upstream.server.server_port)
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: gw\r\n"
        with_length = (head + 'Content-Type: application/json\r\nContent-Length: 9\r\n\r\n{"a": 1}\n').encode()
        chunked = (head + "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").encode()
        for data in (with_length, chunked):
            status, _unused, body = raw_request(gw.port, data)
            assert status == 413, body
            assert error_of(body)["code"] == "request_body_not_allowed"
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            status, headers, body = request(gw.port, method, path)
            assert status == 405, (method, body)
            assert headers["allow"] == "GET, HEAD"
            assert error_of(body)["code"] == "method_not_allowed"
        status, _unused, body = request(gw.port, "GET", f"{path}?key={SECRET}")
        assert status == 400
        assert error_of(body)["code"] == "query_string_not_allowed"
        assert all(not seen["body"] for seen in upstream.everything), "no body reached the backend"

        assert request(gw.port, "GET", path)[0] == 200
        assert request(gw.port, "HEAD", path)[0] == 200
        readiness = [seen for seen in upstream.everything if seen["path"] in ("/v1/models", "/_llmpods/probe")]
        assert (path == "/healthz") != bool(readiness)
        for seen in readiness:
            assert seen["method"] == "GET" and not seen["body"]
            assert "content-length" not in seen["headers"] and "transfer-encoding" not in seen["headers"]
    finally:
        gw.stop()
        upstream.stop()


# --- 5. no secret from a URL, a header or a body reaches a log


def test_no_secret_reaches_a_log(gateway: Gateway, backend: Backend) -> None:
    port = gateway.port
    big = b'{"prompt": "' + SECRET.encode() + b"x" * (11 * 1024 * 1024) + b'"}'
    wrong = [("Authorization", f"Bearer {SECRET}")]
    sent = [
        request(port, "GET", f"/{MODEL_NAME}/v1/models?api_key={SECRET}"),
        request(port, "GET", f"/{MODEL_NAME}/v1/models?api_key={SECRET}", headers=bearer(KEY)),
        request(port, "GET", f"/{MODEL_NAME}/{SECRET}/v1/models", headers=bearer(KEY)),
        request(port, "GET", f"/{SECRET}"),
        request(port, "GET", f"/{MODEL_NAME}/v1/models", headers=wrong),
        request(port, "GET", f"/{MODEL_NAME}/v1/models", headers=[("X-Api-Key", SECRET), *bearer(KEY)]),
        raw_request(port, f"GET /{SECRET}\x00 HTTP/1.1\r\nHost: gw\r\n\r\n".encode()),
        raw_request(port, f"GET /{MODEL_NAME}/v1/models?{SECRET} HTTP/1.0\r\n\r\n".encode()),
        post(port, f"/{MODEL_NAME}/v1/completions?key={SECRET}", big, key=SECRET),
        post(port, f"/{MODEL_NAME}/v1/completions?key={SECRET}", big),
        post(port, f"/{MODEL_NAME}/v1/completions", big),
        post(port, CHAT, b'{"messages": "' + SECRET.encode() + b'", '),
        post(port, CHAT, {"messages": SECRET}),
        post(port, CHAT, {"messages": HI, "max_tokens": 2, "grammar": f'root ::= root "{SECRET}"'}),
        post(port, CHAT, {"messages": HI, "max_tokens": 2, "logit_bias": {SECRET: 1}}),
        events(port, CHAT, {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 4, "stream": True,
                            "stop": [SERVER_FAULT]}),
        events(port, CHAT, {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 4, "stream": True,
                            "stop": [REQUEST_FAULT]}),
    ]  # fmt: skip
    assert all(0 < answer[0] < 500 or answer[0] == 200 for answer in sent), [answer[0] for answer in sent]
    time.sleep(0.5)
    logs = {
        "gateway access log": gateway.access_log.read_text(errors="replace"),
        "gateway error log": gateway.error_log.read_text(errors="replace"),
        "inference server log": backend.log.read_text(errors="replace"),
    }
    for name, text in logs.items():
        assert SECRET not in text, f"the secret is in the {name}"
    assert "client intended to send too large body" in logs["gateway error log"], "the one 413 nginx logs"
    paths = {json.loads(line)["path"] for line in logs["gateway access log"].splitlines()}
    assert "-" in paths and f"/{MODEL_NAME}/v1/models" in paths


# --- 6. the keys file is read once per change, and a change counts within a second


class OpenCounter:
    """Counts the opens of one file, by any process, with inotify (IN_OPEN)."""

    IN_OPEN = 0x20

    def __init__(self, path: Path):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) >= 0

    def count(self) -> int:
        opened = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return opened
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                opened += bool(mask & self.IN_OPEN)
                offset += struct.calcsize("iIII") + length

    def close(self) -> None:
        os.close(self.fd)


def test_the_keys_file_is_read_once_per_change(nginx: None, tmp_path: Path) -> None:
    upstream = Recorder(free_port()).start()
    gw = start_gateway(tmp_path, upstream.server.server_port)
    try:
        key_b = "sk-llmpods-" + uuid.uuid4().hex
        write_keys(gw.keys_file, [KEY, key_b])
        counter = OpenCounter(gw.keys_file)
        try:
            wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(key_b))[0] == 200, 3, 0.05, "key b")
            started, sent = time.monotonic(), 0
            while time.monotonic() - started < 2.5:  # three seconds of the index, at least two whole ones
                for key in (KEY, key_b, "sk-wrong-" + uuid.uuid4().hex):
                    expected = 401 if key.startswith("sk-wrong") else 200
                    assert request(gw.port, "GET", "/v1/models", headers=bearer(key))[0] == expected
                    sent += 1
            opened = counter.count()
        finally:
            counter.close()
        assert sent > 30
        assert opened == 1, f"the keys file was opened {opened} times for {sent} requests"
        versions = [p.name for p in (gw.run_dir / "llmpods-keys").iterdir() if p.name.startswith("v-")]
        assert len(versions) == 1, versions
        print(f"{sent} requests in 2.5 s, the keys file opened {opened} time(s)")
    finally:
        gw.stop()
        upstream.stop()


def test_keys_with_slashes_and_tokens_that_look_like_paths(nginx: None, tmp_path: Path) -> None:
    upstream = Recorder(free_port()).start()
    gw = start_gateway(tmp_path, upstream.server.server_port)
    slashed = "sk-llmpods/" + uuid.uuid4().hex + "/x="
    try:
        write_keys(gw.keys_file, [KEY, slashed, "#" + SECRET, "  .hidden-key  ", "/leading-slash", "sk a"])
        wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(slashed))[0] == 200, 3, 0.05, "key")
        refused = [
            "sk-llmpods",  # a directory of the key index, not a key
            "sk-llmpods/",
            slashed + "/",
            "sk-llmpods/../" + slashed.split("/", 1)[1],
            "../../../../../../etc/passwd",
            "../llmpods-keys",
            ".hidden-key",
            "/leading-slash",
            f"#{SECRET}",
            "sk",
            "a" * 201,
        ]
        for token in refused:
            status, _unused, body = request(gw.port, "GET", "/v1/models", headers=bearer(token))
            assert status == 401, (token, body)
        for token in (KEY, slashed):
            assert request(gw.port, "GET", f"/{MODEL_NAME}/v1/models", headers=bearer(token))[0] == 200

        # One key that is another key plus "/...": the index cannot hold both, and gateway.js compares instead.
        write_keys(gw.keys_file, [KEY, KEY + "/more"])
        wait_for(lambda: request(gw.port, "GET", "/v1/models", headers=bearer(KEY + "/more"))[0] == 200, 3, 0.05)
        assert request(gw.port, "GET", "/v1/models", headers=bearer(KEY))[0] == 200
        assert request(gw.port, "GET", "/v1/models", headers=bearer(slashed))[0] == 401
    finally:
        gw.stop()
        upstream.stop()
