"""A fuzz run against the real gateway (nginx, the config roles/gateway renders) and each real backend serving the
demo model (llama-cpp-python's llmpods_server, and llama-server): structured, seeded, bounded, on loopback only.

Each case is one request, with a valid API key, built by a seeded generator from parts that are valid, nearly
valid or plainly wrong: the request line (method, path, HTTP version), the headers (authorization, framing,
content type, sizes, odd bytes) or the JSON body (each field of each route set to values of the wrong type, out
of range, huge, empty, NaN; bodies truncated, not UTF-8, nested). Every generated request is complete, and every
body asks for at most a few tokens, so no case waits on a timeout or on a long generation. After each case:

- the answer is never a 5xx, never an HTML page, never a traceback or a file path of the server; a refusal is an
  OpenAI-style JSON error;
- another client's valid request, right after it, gets the right answer.

At the end neither the gateway nor the inference server has logged a failure of its own. LLMPODS_FUZZ_SEED and
LLMPODS_FUZZ_CASES change the run; a failure names the seed and the case to replay it.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, need, run_playbook
from helpers.gateway import (
    BACKENDS,
    LEAKS,
    MODEL_NAME,
    Backend,
    Gateway,
    backend_available,
    error_of,
    nginx_ok,
    raw_request,
    wait_for,
    write_keys,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("LLMPODS_FUZZ_SEED", "12"))
CASES = int(os.environ.get("LLMPODS_FUZZ_CASES", "300"))
KEY = "sk-llmpods-" + uuid.uuid4().hex
PREFIX = f"/{MODEL_NAME}"
HI = [{"role": "user", "content": "Hi"}]
# Valid requests to start from: (path, body). Every one asks for at most 4 tokens.
BASES = [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
    ("/extras/tokenize", {"input": "hello"}),
    ("/extras/tokenize/count", {"messages": HI}),
    ("/extras/detokenize", {"tokens": [1, 2, 3]}),
    ("/v1/embeddings", {"input": "hi"}),
]
# Fields each body may get, besides its own.
GENERATION_FIELDS = [
    "stream", "stop", "seed", "top_k", "top_p", "min_p", "temperature", "logit_bias", "logit_bias_type",
    "presence_penalty", "frequency_penalty", "repeat_penalty", "mirostat_mode", "mirostat_tau", "min_tokens",
    "grammar", "user", "n", "model", "max_tokens", "echo", "logprobs", "suffix", "best_of",
]  # fmt: skip
CHAT_FIELDS = ["top_logprobs", "response_format", "tools", "tool_choice", "functions", "function_call"]
ODD = [
    None, True, False, 0, 1, -1, 2**31, -(2**31) - 1, 2**63, 2**200, 0.5, -0.0, 1e308, float("nan"), float("inf"),
    "", "x", "lots", "4", "\u0000", "\ud800", "é" * 300, [], [1], ["a"], [[[]]], {}, {"a": 1}, {"type": "text"},
]  # fmt: skip
# max_tokens never becomes 0, negative or missing: each of those asks for the whole context.
MAX_TOKENS = [1, 2, 4, "4", "lots", 4.5, [], {}, None, True]
GRAMMARS = ['root ::= "a"', "root ::= [a-z]+", "root ::= (", 'root ::= root "a"', "", "x ::= y", "root ::= \u0000"]
ROLES = ["user", "system", "assistant", "tool", "function", "", "admin", 1, None]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PRI", "get", "G\x00T"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.9", "HTTP/1", "HTTP/11", "FOO/1.1", "http/1.1"]
PATHS = [
    "/v1/models", "/v1/chat/completions", "/extras/tokenize", "/v1/models/", "//v1/models", "/v1//models",
    "/v1/models/smollm2", "/v1/%6Dodels", "/%2e%2e/etc/passwd", "/v1/models%00", "/v1/../v1/models", "/./v1/models",
    "/v1/models?x=1", "/v1/models#frag", "*", "http://elsewhere/v1/models", "/\\v1\\models", "/v1/modèls",
    "/" + "a" * 5000, "/_llmpods/forward", "/_llmpods/authorized", "/_llmpods/error/not_found", "/alive", "/healthz",
    "/docs", "/openapi.json", "/v1/engines/copilot-codex/completions", "",
]  # fmt: skip


def odd(rng: random.Random) -> object:
    return rng.choice(ODD)


def mutate_body(rng: random.Random, path: str, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    generating = path in ("/v1/chat/completions", "/v1/completions")
    fields = list(body)
    if generating:
        fields += GENERATION_FIELDS + (CHAT_FIELDS if "messages" in body else [])
    for _unused in range(rng.randint(1, 3)):
        field = rng.choice(fields)
        if field == "max_tokens":
            body[field] = rng.choice(MAX_TOKENS)
        elif field == "grammar":
            body[field] = rng.choice(GRAMMARS)
        elif field == "messages":
            body[field] = rng.choice(
                [
                    odd(rng),
                    [{"role": rng.choice(ROLES), "content": rng.choice(["Hi", odd(rng)])}],
                    [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                    [{"role": "user", "content": "Hi"}] * 40,
                    [{"role": "user", "content": "word " * 3000}],  # longer than the context
                    [{"content": "Hi"}],
                ]
            )
        elif field == "logit_bias":
            body[field] = rng.choice([{"abc": 1}, {"99999999": 1}, {"-1": 5}, {"0": float("nan")}, {"1": -100}, []])
        elif field == "response_format":
            schema = rng.choice([{"type": "object"}, {"type": "nonsense"}, {"type": "string", "pattern": "(("}, "x"])
            body[field] = rng.choice([{"type": "json_object"}, {"type": "json_object", "schema": schema}, odd(rng)])
        elif field == "stream":
            body[field] = rng.choice([True, False, odd(rng)])
        elif field in body and rng.random() < 0.15 and field not in ("max_tokens",):
            del body[field]
        else:
            body[field] = odd(rng)
        if generating and "max_tokens" not in body:
            body["max_tokens"] = 4
    return body


def encode(rng: random.Random, body: dict) -> tuple[bytes, str]:
    data = json.dumps(body).encode()
    shape = rng.random()
    if shape < 0.06:
        data = data[: rng.randint(0, len(data))]  # truncated
    elif shape < 0.10:
        data += b"}}garbage"
    elif shape < 0.13:
        data = data.replace(b'"', b'"\xff', 1)  # not UTF-8
    elif shape < 0.15:
        data = b"[" * 5000 + data + b"]" * 5000
    content_type = rng.choice(["application/json"] * 8 + ["text/plain", "", "application/json; charset=latin-1"])
    return data, content_type


def message(method: str, path: str, version: str, headers: list[tuple[str, str]], data: bytes = b"") -> bytes:
    head = f"{method} {path} {version}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + data


def request_line_case(rng: random.Random) -> bytes:
    method = rng.choice(METHODS)
    path = rng.choice(PATHS)
    if rng.random() < 0.5 and path.startswith("/v1"):
        path = PREFIX + path
    version = rng.choice(VERSIONS)
    headers = [("Host", "gw"), ("Authorization", f"Bearer {KEY}")]
    data = b""
    if method == "POST" and rng.random() < 0.5:
        data = b'{"input": "hello"}'
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return message(method, path, version, headers, data)


def header_case(rng: random.Random) -> bytes:
    path, body = rng.choice(BASES[:3])
    data = json.dumps(body).encode()
    headers = [("Host", "gw"), ("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json")]
    framing = [("Content-Length", str(len(data)))]
    twist = rng.randrange(14)
    if twist == 0:
        headers.append(("Authorization", f"Bearer {KEY}"))
    elif twist == 1:
        variants = [f"bearer  {KEY}", f"BEARER {KEY}", f"Bearer\t{KEY}", f"Bearer {KEY} ", "Bearer", f"Basic {KEY}"]
        headers[1] = ("Authorization", rng.choice(variants))
    elif twist == 2:
        framing = [("Content-Length", str(len(data))), ("Transfer-Encoding", "chunked")]
    elif twist == 3:
        framing = [("Transfer-Encoding", "chunked")]
        data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    elif twist == 4:
        framing = [("Transfer-Encoding", rng.choice(["gzip", "chunked, gzip", "identity", "xchunked"]))]
    elif twist == 5:
        framing = [("Content-Length", rng.choice(["-1", "1e3", "0x10", " 5", "99999999999999999999"]))]
    elif twist == 6:
        framing = [("Content-Length", "0")]  # a shorter body: the rest reads as a second request
    elif twist == 7:
        headers.append(("X-Big", "a" * rng.choice([100, 7000, 20000])))
    elif twist == 8:
        headers.append((rng.choice(["X Space", "X\x00Nul", "", "X_Under", "Ünï"]), "v"))
    elif twist == 9:
        hosts = [("Host", ""), ("Host", "a b"), ("Host", "[::1"), ("Host", "gw:99999"), ("X-Host", "gw")]
        headers[0] = rng.choice(hosts)
    elif twist == 10:
        headers.append(("Expect", "100-continue"))
    elif twist == 11:
        headers += [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQ")]
    elif twist == 12:
        types = ["", "text/plain", "multipart/form-data; boundary=x", "application/json;;", "application/x-json"]
        headers[2] = ("Content-Type", rng.choice(types))
    else:
        headers += [(" Folded", "line"), ("X-Forwarded-For", "1.2.3.4, nonsense"), ("Range", "bytes=0-1")]
    return message("POST", PREFIX + path, "HTTP/1.1", headers + framing, data)


def body_case(rng: random.Random) -> bytes:
    path, body = rng.choice(BASES)
    data, content_type = encode(rng, mutate_body(rng, path, body))
    headers = [("Host", "gw"), ("Authorization", f"Bearer {KEY}")]
    if content_type:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(len(data))))
    return message("POST", PREFIX + path, "HTTP/1.1", headers, data)


def cases(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)  # noqa: S311 - reproducible cases, not secrets
    made = []
    for _unused in range(count):
        kind = rng.choices(["request line", "headers", "body"], weights=[1, 1, 2])[0]
        build = {"request line": request_line_case, "headers": header_case, "body": body_case}[kind]
        made.append((kind, build(rng)))
    return made


@pytest.fixture(scope="module", params=BACKENDS)
def pod(demo_model: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    need(nginx_ok(), "nginx with the njs module (Debian: nginx-light libnginx-mod-http-js)")
    need(*backend_available(request.param))
    root = tmp_path_factory.mktemp("fuzz")
    backend = Backend(demo_model, free_port(), root / "backend.log", kind=request.param).start()
    gw = Gateway(root / "gateway", upstream_port=backend.port, listen_port=free_port(), gateway_backend=request.param)
    write_keys(gw.keys_file, [KEY])
    try:
        backend.wait_ready()
        gw.render(run_playbook)
        gw.start()
        wait_for(lambda: gw.alive()[0] == 200, 30, what="gateway /alive 200")
        yield gw, backend
    finally:
        gw.stop()
        backend.kill()


def valid(port: int, path: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    headers = [("Host", "gw"), ("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json")]
    status, _unused, answer = raw_request(
        port, message("POST", PREFIX + path, "HTTP/1.1", [*headers, ("Content-Length", str(len(data)))], data)
    )
    return status, json.loads(answer) if status == 200 else {"raw": answer[:300]}


def test_fuzz_no_request_breaks_the_pod(pod) -> None:
    gw, backend = pod
    expected_tokens = valid(gw.port, "/extras/tokenize", {"input": "hello world"})[1]["tokens"]
    statuses: collections.Counter[int] = collections.Counter()
    started = time.monotonic()
    for number, (kind, data) in enumerate(cases(SEED, CASES)):
        where = f"seed {SEED}, case {number} ({kind}): {data[:300]!r}"
        status, headers, body = raw_request(gw.port, data, timeout=60)
        statuses[status] += 1
        assert status != 0, f"no answer; {where}"
        assert status < 500, f"{status} {body[:300]!r}; {where}"
        if status >= 400 and not data.startswith(b"HEAD "):
            assert headers.get("content-type", "").startswith("application/json"), f"{headers}; {where}"
            try:
                error_of(body)
            except (AssertionError, ValueError, KeyError) as exc:
                raise AssertionError(f"not an OpenAI error ({exc}): {body[:300]!r}; {where}") from exc

        status, answer = valid(gw.port, "/extras/tokenize", {"input": "hello world"})
        assert (status, answer.get("tokens")) == (200, expected_tokens), f"after {where}: {status} {answer}"
        if number % 20 == 0:
            status, answer = valid(gw.port, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
            assert status == 200, f"after {where}: {answer}"
            assert answer["choices"][0]["finish_reason"] in ("stop", "length")

    elapsed = time.monotonic() - started
    time.sleep(0.5)
    gateway_errors = gw.error_log.read_text(errors="replace")
    backend_log = backend.log.read_text(errors="replace")
    for level in ("[crit]", "[alert]", "[emerg]"):
        assert level not in gateway_errors
    assert "while serving" not in backend_log, "the inference server failed on a request (see its log)"
    assert "Exception in ASGI application" not in backend_log
    for leak in LEAKS[:1]:
        assert leak not in backend_log
    print(f"{CASES} cases (seed {SEED}) in {elapsed:.0f} s; answers by status: {dict(sorted(statuses.items()))}")
