"""The waiter of model_ready: pure predicates, the loop on a fake clock, and the loop against real local
HTTP servers with scripted answers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
from conftest import need_module

# Before the collection: makes it importable under plain pytest.
from helpers.gateway_stub import (
    Reply,
    ScriptedServer,
    TLSFiles,
    alive,
    chat_completion,
    closed_port,
    loading,
    make_tls_files,
    model_list,
    unauthorized,
)

from ansible_collections.llmpods.inference.plugins.module_utils._http import Answer, Client, trim
from ansible_collections.llmpods.inference.plugins.module_utils._model_ready import (
    AUTH,
    OK,
    REJECT,
    RETRY,
    WAIT_SPEC,
    KeyRejectedError,
    NotReadyError,
    RequestRejectedError,
    Target,
    Waiter,
    classify,
    completion_result,
    join_url,
    listed_ids,
    models_listed,
    normalize_base_url,
    readiness_ok,
    seconds,
)

KEY = "sk-test-0123456789"


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    """``serve({path: [Reply, ...]})`` starts a scripted gateway, stopped after the test."""
    with ExitStack() as stack:
        yield lambda script, tls=None: stack.enter_context(ScriptedServer(script, tls))


# --- pure predicates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (None, RETRY),
        (200, OK),
        (204, OK),
        (401, AUTH),
        (403, AUTH),
        (404, RETRY),
        (408, RETRY),
        (429, RETRY),
        (500, RETRY),
        (502, RETRY),
        (503, RETRY),
        (504, RETRY),
        (400, REJECT),
        (405, REJECT),
        (422, REJECT),
    ],
)
def test_classify(status: int | None, verdict: str) -> None:
    assert classify(status) == verdict


@pytest.mark.parametrize(
    ("status", "body", "ready"),
    [
        (200, '{"status":"ready","model":"smollm2"}', True),
        (200, '{"status":"ready"}', True),
        (200, "ok", True),
        (200, "", True),
        (200, '{"status":"ready","model":"other"}', False),
        (503, '{"status":"loading","model":"smollm2"}', False),
        (None, "", False),
        (204, "", False),
    ],
)
def test_readiness_ok(status: int | None, body: str, ready: bool) -> None:
    assert readiness_ok(status, body, "smollm2") is ready


def test_readiness_ok_without_a_model_takes_any_200() -> None:
    assert readiness_ok(200, '{"status":"ready","model":"other"}')


def test_models_listed() -> None:
    payload = {"object": "list", "data": [{"id": "tinyllama"}, {"id": "smollm2", "object": "model"}]}
    assert listed_ids(payload) == ["tinyllama", "smollm2"]
    assert models_listed(payload, "smollm2")
    assert not models_listed(payload, "qwen2")


@pytest.mark.parametrize("payload", [None, [], "x", {}, {"data": None}, {"data": [1, {"name": "smollm2"}]}])
def test_models_listed_tolerates_odd_answers(payload: object) -> None:
    assert listed_ids(payload) == []
    assert not models_listed(payload, "smollm2")


def test_completion_result() -> None:
    payload = {
        "model": "smollm2",
        "choices": [{"message": {"role": "assistant", "content": "OK"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 1, "total_tokens": 32},
    }
    assert completion_result(payload) == {
        "text": "OK",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 31, "completion_tokens": 1, "total_tokens": 32},
        "model": "smollm2",
    }
    assert completion_result({"choices": [{"text": "hi", "finish_reason": "stop"}]})["text"] == "hi"
    assert completion_result({"choices": []}) is None
    assert completion_result({"error": "x"}) is None
    assert completion_result(None) is None


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8080/",
        "http://127.0.0.1:8080/smollm2",
        "http://127.0.0.1:8080/smollm2/v1",
        "http://127.0.0.1:8080/smollm2/v1/",
    ],
)
def test_normalize_base_url(base: str) -> None:
    assert normalize_base_url(base, "smollm2") == "http://127.0.0.1:8080"
    assert Target(base_url=base, model="smollm2").endpoint == "http://127.0.0.1:8080/smollm2/v1"


def test_normalize_base_url_keeps_a_path_prefix() -> None:
    assert normalize_base_url("https://example.com/llm/smollm2/v1", "smollm2") == "https://example.com/llm"
    assert normalize_base_url("https://example.com/llm", "smollm2") == "https://example.com/llm"


def test_join_url() -> None:
    assert join_url("http://h:1", "/alive") == "http://h:1/alive"
    assert join_url("http://h:1/", "alive") == "http://h:1/alive"


def test_trim_and_describe() -> None:
    assert trim('{\n  "status": "loading"\n}') == '{ "status": "loading" }'
    long = trim("x" * 1000)
    assert len(long) == 300
    assert long.endswith("...")
    assert Answer(status=503, body='{"status":"loading"}').describe() == '503 {"status":"loading"}'
    assert Answer(status=502).describe() == "502"
    assert Answer(error="connection refused").describe() == "no answer (connection refused)"


def test_seconds() -> None:
    assert seconds(0.43) == "0.4"
    assert seconds(9.96) == "10.0"
    assert seconds(300.2) == "300"


def test_wait_spec_matches_its_doc_fragment() -> None:
    import yaml

    from ansible_collections.llmpods.inference.plugins.doc_fragments._wait import ModuleDocFragment

    documented = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["options"]
    assert set(documented) == set(WAIT_SPEC)
    for name, spec in WAIT_SPEC.items():
        assert documented[name]["type"] == spec["type"]
        assert documented[name]["default"] == spec["default"]


# --- the loop on a fake clock -------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that only moves when the waiter sleeps or a request takes time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted_fetch(clock: FakeClock, answers: dict[str, list[Answer]], cost: float = 0.0):
    calls: list[tuple[str, str, float]] = []

    def fetch(method: str, url: str, headers=None, data=None, timeout: float = 30.0) -> Answer:
        calls.append((method, url, timeout))
        clock.now += cost
        stage_answers = answers[url.rsplit("/", 1)[-1]]
        return stage_answers.pop(0) if len(stage_answers) > 1 else stage_answers[0]

    return fetch, calls


def test_loop_never_sleeps_past_the_deadline() -> None:
    clock = FakeClock()
    fetch, calls = scripted_fetch(clock, {"alive": [Answer(status=503, body="{}")]}, cost=0.25)
    waiter = Waiter(Target("http://gw", "smollm2"), fetch, wait_timeout=5, wait_sleep=2, clock=clock, sleep=clock.sleep)
    with pytest.raises(NotReadyError) as caught:
        waiter.run()
    # requests at 0, 2.25, 4.5 and 5 (the deadline, after a sleep cut to 0.25 s); each takes 0.25 s
    assert clock.sleeps == [2, 2, pytest.approx(0.25)]
    assert clock.now - 1000.0 == pytest.approx(5.25)
    assert caught.value.stage == "readiness"
    assert caught.value.last.status == 503
    assert len(calls) == waiter.stages["readiness"].attempts == 4
    # the request timeout is cut to the time left, never below one second
    assert [round(call[2], 2) for call in calls] == [5.0, 2.75, 1.0, 1.0]


def test_every_stage_is_asked_once_even_past_the_deadline() -> None:
    clock = FakeClock()
    fetch, calls = scripted_fetch(
        clock,
        {
            "alive": [Answer(status=503), Answer(status=200, body='{"status":"ready"}')],
            "models": [Answer(status=200, body=json.dumps({"data": [{"id": "smollm2"}]}))],
        },
        cost=3.0,
    )
    waiter = Waiter(Target("http://gw", "smollm2"), fetch, wait_timeout=4, wait_sleep=1, clock=clock, sleep=clock.sleep)
    result = waiter.run()
    assert result["ready"] is True
    assert [call[1] for call in calls] == ["http://gw/alive", "http://gw/alive", "http://gw/smollm2/v1/models"]
    assert result["stages"]["models"]["attempts"] == 1
    assert result["elapsed"] == pytest.approx(10.0)


def test_wait_timeout_zero_asks_once() -> None:
    clock = FakeClock()
    fetch, calls = scripted_fetch(clock, {"alive": [Answer(error="connection refused")]})
    waiter = Waiter(Target("http://gw", "smollm2"), fetch, wait_timeout=0, wait_sleep=1, clock=clock, sleep=clock.sleep)
    with pytest.raises(NotReadyError, match=r"not ready after 0\.0 s; no readiness answer \(connection refused\)"):
        waiter.run()
    assert len(calls) == 1
    assert clock.sleeps == []


def test_unverifiable_certificate_fails_at_once() -> None:
    clock = FakeClock()
    bad_tls = Answer(error="TLS verification failed: certificate verify failed", retryable=False)
    fetch, calls = scripted_fetch(clock, {"alive": [bad_tls]})
    waiter = Waiter(
        Target("https://gw", "smollm2"), fetch, wait_timeout=60, wait_sleep=1, clock=clock, sleep=clock.sleep
    )
    with pytest.raises(RequestRejectedError, match="TLS verification failed"):
        waiter.run()
    assert len(calls) == 1


# --- the loop against real local servers --------------------------------------------------------------


def waiter_for(url: str, **kwargs) -> Waiter:
    target_keys = {"api_key", "readiness_path", "completion", "completion_prompt", "completion_max_tokens"}
    target = Target(base_url=url, model="smollm2", **{k: v for k, v in kwargs.items() if k in target_keys})
    options = {k: v for k, v in kwargs.items() if k not in target_keys}
    options.setdefault("wait_timeout", 5)
    options.setdefault("wait_sleep", 0.05)
    options.setdefault("request_timeout", 2)
    return Waiter(target, Client().fetch, **options)


def test_nothing_listening_times_out_naming_the_connection_error() -> None:
    port = closed_port()
    waiter = waiter_for(f"http://127.0.0.1:{port}", wait_timeout=1, wait_sleep=0.2)
    started = time.monotonic()
    with pytest.raises(NotReadyError) as caught:
        waiter.run()
    took = time.monotonic() - started
    assert 1.0 <= took < 30, "waits out wait_timeout, then stops (generous bound for a busy host)"
    message = str(caught.value)
    assert re.match(r"model smollm2 not ready after (1|[2-9]|\d\d+)\.\d s;", message), message
    assert "no readiness answer (connection refused)" in message
    assert f"GET http://127.0.0.1:{port}/alive" in message
    result = waiter.result()
    assert result["ready"] is False
    assert result["stages"]["readiness"]["status"] == "timed_out"
    assert result["stages"]["readiness"]["attempts"] >= 3
    assert result["stages"]["models"]["status"] == "not_reached"
    assert result["last_status"] is None
    assert result["last_error"] == "connection refused"


def test_loading_then_ready(serve) -> None:
    server = serve(
        {
            "/alive": [loading(), loading(), alive()],
            "/smollm2/v1/models": [model_list("smollm2")],
        }
    )
    result = waiter_for(server.url, api_key=KEY).run()
    assert result["ready"] is True
    assert result["models"] == ["smollm2"]
    assert result["stages"]["readiness"]["status"] == "ok"
    assert result["stages"]["readiness"]["attempts"] == 3
    assert result["stages"]["readiness"]["http_status"] == 200
    assert result["stages"]["readiness"]["seconds"] >= 0.1  # two sleeps of 0.05 s
    assert result["stages"]["models"] == {
        "status": "ok",
        "attempts": 1,
        "seconds": result["stages"]["models"]["seconds"],  # any duration: the other fields are the point
        "http_status": 200,
        "url": f"{server.url}/smollm2/v1/models",
    }
    assert result["stages"]["completion"]["status"] == "skipped"
    assert result["attempts"] == 4
    assert result["elapsed"] >= result["stages"]["readiness"]["seconds"]
    assert result["endpoint"] == f"{server.url}/smollm2/v1"
    assert "completion" not in result
    # the key goes to the model routes only, as a bearer token
    assert "Authorization" not in server.requests("/alive")[0].headers
    assert server.requests("/smollm2/v1/models")[0].headers["Authorization"] == f"Bearer {KEY}"


def test_loading_until_the_deadline_quotes_the_last_answer(serve) -> None:
    server = serve({"/alive": [loading()]})
    with pytest.raises(NotReadyError) as caught:
        waiter_for(server.url, wait_timeout=1, wait_sleep=0.1).run()
    assert re.match(
        r"model smollm2 not ready after (1|[2-9]|\d\d+)\.\d s; "
        r'last readiness answer 503 \{"status": "loading", "model": "smollm2", '
        r'"message": "GET /v1/models on the inference backend: status 502"\} '
        rf"\(GET {server.url}/alive, \d+ attempts\)$",
        str(caught.value),
    )


def test_wrong_key_fails_at_once(serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [unauthorized()]})
    waiter = waiter_for(server.url, api_key="wrong", wait_timeout=30, wait_sleep=1)
    started = time.monotonic()
    with pytest.raises(KeyRejectedError) as caught:
        waiter.run()
    assert time.monotonic() - started < 15, "not retried until the 30 s wait_timeout"
    message = str(caught.value)
    assert "the gateway rejected the API key; check api_key" in message
    assert "models answered 401" in message
    assert "invalid_api_key" in message
    assert "wrong" not in message
    assert len(server.requests("/smollm2/v1/models")) == 1
    assert waiter.result()["stages"]["models"]["status"] == "failed"


def test_missing_key_says_so(serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [Reply(403, {"error": "forbidden"})]})
    with pytest.raises(KeyRejectedError, match="demands an API key and none was given; set api_key"):
        waiter_for(server.url, wait_timeout=30).run()


def test_model_missing_names_the_listed_ids(serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [model_list("tinyllama", "qwen2")]})
    waiter = waiter_for(server.url, api_key=KEY, wait_timeout=1, wait_sleep=0.1)
    with pytest.raises(NotReadyError) as caught:
        waiter.run()
    message = str(caught.value)
    assert re.match(r"model smollm2 not listed after (1|[2-9]|\d\d+)\.\d s;", message), message
    assert f"; the models answer lists: tinyllama, qwen2 (GET {server.url}/smollm2/v1/models, " in message
    assert len(server.requests("/smollm2/v1/models")) >= 2, "asked again until the deadline"
    assert waiter.result()["models"] == ["tinyllama", "qwen2"]


def test_the_key_does_not_follow_a_redirect(serve) -> None:
    """A models answer that redirects elsewhere: the request is followed, the key is not sent along."""
    elsewhere = serve({"/smollm2/v1/models": [model_list("smollm2")]})
    gateway = serve(
        {
            "/alive": [alive()],
            "/smollm2/v1/models": [Reply(302, "", headers={"Location": f"{elsewhere.url}/smollm2/v1/models"})],
        }
    )
    result = waiter_for(gateway.url, api_key=KEY).run()
    assert result["ready"] is True
    assert gateway.requests("/smollm2/v1/models")[0].headers["Authorization"] == f"Bearer {KEY}"
    [followed] = elsewhere.requests("/smollm2/v1/models")
    assert "Authorization" not in followed.headers, followed.headers


def test_model_listed_late(serve) -> None:
    server = serve(
        {
            "/alive": [alive()],
            "/smollm2/v1/models": [
                Reply(502, "<html>Bad Gateway</html>"),
                model_list(),
                model_list("smollm2"),
            ],
        }
    )
    result = waiter_for(server.url, api_key=KEY).run()
    assert result["stages"]["models"]["attempts"] == 3
    assert result["models"] == ["smollm2"]


def test_readiness_of_another_model_is_not_ready(serve) -> None:
    server = serve({"/alive": [alive("tinyllama")]})
    with pytest.raises(NotReadyError, match=r'last readiness answer 200 \{"status": "ready", "model": "tinyllama"\}'):
        waiter_for(server.url, wait_timeout=0.5, wait_sleep=0.1).run()


def test_completion_stage(serve) -> None:
    server = serve(
        {
            "/alive": [alive()],
            "/smollm2/v1/models": [model_list("smollm2")],
            "/smollm2/v1/chat/completions": [Reply(503, {"error": "busy"}), chat_completion("OK")],
        }
    )
    result = waiter_for(
        server.url + "/smollm2/v1", api_key=KEY, completion=True, completion_prompt="Hi", completion_max_tokens=3
    ).run()
    assert result["ready"] is True
    assert result["completion"] == {
        "text": "OK",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 31, "completion_tokens": 1, "total_tokens": 32},
        "model": "smollm2",
    }
    assert result["stages"]["completion"]["status"] == "ok"
    assert result["stages"]["completion"]["attempts"] == 2
    sent = server.requests("/smollm2/v1/chat/completions")[-1]
    assert sent.method == "POST"
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert json.loads(sent.body) == {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": False,
    }


def test_completion_rejected_is_not_retried(serve) -> None:
    server = serve(
        {
            "/alive": [alive()],
            "/smollm2/v1/models": [model_list("smollm2")],
            "/smollm2/v1/chat/completions": [Reply(400, {"error": {"message": "context too long"}})],
        }
    )
    with pytest.raises(RequestRejectedError, match=r"completion answered 400 .*context too long.*; not retried"):
        waiter_for(server.url, api_key=KEY, completion=True, wait_timeout=30).run()
    assert len(server.requests("/smollm2/v1/chat/completions")) == 1


def test_completion_unauthorized_is_a_key_problem(serve) -> None:
    server = serve(
        {
            "/alive": [alive()],
            "/smollm2/v1/models": [model_list("smollm2")],
            "/smollm2/v1/chat/completions": [unauthorized()],
        }
    )
    with pytest.raises(KeyRejectedError, match="completion answered 401"):
        waiter_for(server.url, api_key=KEY, completion=True, wait_timeout=30).run()


def test_slow_answer_is_a_transient_timeout(serve) -> None:
    server = serve({"/alive": [Reply(200, {"status": "ready"}, delay=1.5)]})
    with pytest.raises(NotReadyError, match=r"no readiness answer \(timed out after 1 s\)"):
        waiter_for(server.url, wait_timeout=0.5, request_timeout=1).run()


def test_readiness_stage_can_be_skipped_and_host_header_is_sent(serve) -> None:
    server = serve({"/smollm2/v1/models": [model_list("smollm2")]})
    waiter = Waiter(
        Target(base_url=server.url, model="smollm2", api_key=KEY, readiness_path=""),
        Client(host_header="llm.example.com").fetch,
        wait_timeout=5,
        wait_sleep=0.05,
    )
    result = waiter.run()
    assert result["stages"]["readiness"]["status"] == "skipped"
    assert result["stages"]["readiness"]["attempts"] == 0
    assert server.requests("/alive") == []
    assert server.requests("/smollm2/v1/models")[0].headers["Host"] == "llm.example.com"


def test_readiness_behind_an_auth_proxy_is_reported(serve) -> None:
    server = serve({"/alive": [Reply(401, "Unauthorized")]})
    with pytest.raises(RequestRejectedError, match="something in front of the gateway demands one"):
        waiter_for(server.url, wait_timeout=30).run()


# --- TLS ------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_gateway(tmp_path, serve) -> tuple[ScriptedServer, TLSFiles]:
    need_module("cryptography", "cryptography, which makes the test certificates")
    files = make_tls_files(tmp_path)
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [model_list("smollm2")]}, tls=files)
    return server, files


def test_unverifiable_server_certificate_fails_at_once(tls_gateway) -> None:
    server, _files = tls_gateway
    waiter = waiter_for(server.url, api_key=KEY, wait_timeout=30)
    started = time.monotonic()
    with pytest.raises(RequestRejectedError, match=r"readiness request to https://127\.0\.0\.1:\d+/alive failed: TLS"):
        waiter.run()
    assert time.monotonic() - started < 15, "not retried until the 30 s wait_timeout"
    assert waiter.result()["stages"]["readiness"]["attempts"] == 1


def test_ca_path_verifies_the_server_certificate(tls_gateway) -> None:
    server, files = tls_gateway
    waiter = Waiter(
        Target(base_url=server.url, model="smollm2", api_key=KEY), Client(ca_path=str(files.ca)).fetch, wait_timeout=5
    )
    assert waiter.run()["ready"] is True


def test_validate_certs_false_accepts_any_certificate(tls_gateway) -> None:
    server, _files = tls_gateway
    waiter = Waiter(
        Target(base_url=server.url, model="smollm2", api_key=KEY), Client(validate_certs=False).fetch, wait_timeout=5
    )
    assert waiter.run()["ready"] is True
