"""model_ready run as Ansible runs it: a separate Python process reading its arguments from a file, and once
through the ``ansible`` command line; answers come from real local HTTP servers with scripted replies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import need

# Before the collection: makes it importable under plain pytest.
from helpers.gateway_stub import (
    Reply,
    ScriptedServer,
    alive,
    chat_completion,
    closed_port,
    loading,
    model_list,
    unauthorized,
)

from ansible_collections.llmpods.inference.plugins.modules import model_ready

KEY = "sk-llmpods-unit-7f3a9c"
MODULE = "ansible_collections.llmpods.inference.plugins.modules.model_ready"
# .../ansible_collections/llmpods/inference/plugins/modules/model_ready.py -> the directory above ansible_collections
COLLECTIONS = Path(model_ready.__file__).parents[5]


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, list[Reply]]], ScriptedServer]]:
    """``serve({path: [Reply, ...]})`` starts a scripted gateway, stopped after the test."""
    with ExitStack() as stack:
        yield lambda script: stack.enter_context(ScriptedServer(script))


def module_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(COLLECTIONS), env.get("PYTHONPATH", "")) if p)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    return env


class Run:
    def __init__(self, proc: subprocess.CompletedProcess[str], seconds: float) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.seconds = seconds
        self.result = json.loads(proc.stdout)


def run_module(tmp_path: Path, check_mode: bool = False, **args: object) -> Run:
    """Run the module in its own process with ``{"ANSIBLE_MODULE_ARGS": ...}`` in a file, as Ansible does."""
    module_args = dict(args)
    if check_mode:
        module_args["_ansible_check_mode"] = True
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, str(args_file)],
        env=module_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(proc, time.monotonic() - started)


def ready_gateway(serve, model: str = "smollm2"):
    return serve(
        {
            "/alive": [loading(model), alive(model)],
            f"/{model}/v1/models": [model_list(model)],
            f"/{model}/v1/chat/completions": [chat_completion("OK", model)],
        }
    )


def test_ready_with_completion(tmp_path: Path, serve) -> None:
    server = ready_gateway(serve)
    run = run_module(
        tmp_path,
        base_url=server.url,
        model="smollm2",
        api_key=KEY,
        completion=True,
        wait_timeout=10,
        wait_sleep=0.1,
    )
    assert run.rc == 0, run.stdout + run.stderr
    result = run.result
    assert result["changed"] is False
    assert result["ready"] is True
    assert "failed" not in result
    assert result["endpoint"] == f"{server.url}/smollm2/v1"
    assert result["models"] == ["smollm2"]
    assert result["completion"]["text"] == "OK"
    assert result["completion"]["usage"]["completion_tokens"] == 1
    assert [result["stages"][s]["status"] for s in ("readiness", "models", "completion")] == ["ok", "ok", "ok"]
    assert [result["stages"][s]["attempts"] for s in ("readiness", "models", "completion")] == [2, 1, 1]
    assert result["attempts"] == 4
    assert result["stages"]["readiness"]["seconds"] >= 0.1
    assert result["elapsed"] >= sum(stage["seconds"] for stage in result["stages"].values()) - 0.01
    assert result["last_status"] == 200
    assert '"chat.completion"' in result["last_body"]


def test_api_key_is_never_shown(tmp_path: Path, serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [unauthorized()]})
    run = run_module(tmp_path, base_url=server.url, model="smollm2", api_key=KEY, wait_timeout=5)
    assert run.rc == 1
    assert run.result["invocation"]["module_args"]["api_key"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert KEY not in run.stdout
    assert KEY not in run.stderr
    # ... though it was sent, as a bearer token
    assert server.requests("/smollm2/v1/models")[0].headers["Authorization"] == f"Bearer {KEY}"


def test_unauthorized_fails_fast_as_a_key_problem(tmp_path: Path, serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [unauthorized()]})
    run = run_module(tmp_path, base_url=server.url, model="smollm2", api_key="sk-wrong", wait_timeout=60, wait_sleep=1)
    assert run.rc == 1
    # A generous bound on a busy host, still far below the 60 s wait_timeout a retry loop would spend.
    assert run.seconds < 30, "a rejected key must not be retried until wait_timeout"
    result = run.result
    assert result["failed"] is True
    assert result["changed"] is False
    assert result["ready"] is False
    assert result["failed_stage"] == "models"
    assert result["msg"].startswith("model smollm2: the gateway rejected the API key; check api_key")
    assert "models answered 401 {" in result["msg"]
    assert f"GET {server.url}/smollm2/v1/models" in result["msg"]
    assert result["last_status"] == 401
    assert "invalid_api_key" in result["last_body"]
    assert result["stages"]["readiness"]["status"] == "ok"
    assert result["stages"]["models"]["status"] == "failed"
    assert result["stages"]["models"]["attempts"] == 1


def waited(message: str, what: str) -> float:
    """The seconds that a "model smollm2 <what> after N s" message names; fails when the message is not one."""
    found = re.match(rf"model smollm2 {what} after (\d+\.\d) s", message)
    assert found, message
    return float(found.group(1))


def test_nothing_listening(tmp_path: Path) -> None:
    port = closed_port()
    run = run_module(tmp_path, base_url=f"http://127.0.0.1:{port}", model="smollm2", wait_timeout=1, wait_sleep=0.2)
    assert run.rc == 1
    result = run.result
    assert waited(result["msg"], "not ready") >= 1.0
    assert f"no readiness answer (connection refused) (GET http://127.0.0.1:{port}/alive," in result["msg"]
    assert result["failed_stage"] == "readiness"
    assert result["stages"]["readiness"]["status"] == "timed_out"
    assert result["stages"]["readiness"]["attempts"] >= 3
    assert result["stages"]["readiness"]["seconds"] >= 1.0
    assert result["last_status"] is None
    assert result["last_error"] == "connection refused"


def test_model_missing_names_what_is_listed(tmp_path: Path, serve) -> None:
    server = serve({"/alive": [alive()], "/smollm2/v1/models": [model_list("tinyllama")]})
    run = run_module(tmp_path, base_url=server.url, model="smollm2", api_key=KEY, wait_timeout=1, wait_sleep=0.2)
    assert run.rc == 1
    assert waited(run.result["msg"], "not listed") >= 1.0
    assert "; the models answer lists: tinyllama (GET http" in run.result["msg"]
    assert run.result["models"] == ["tinyllama"]
    assert run.result["failed_stage"] == "models"


def test_check_mode_runs_the_checks(tmp_path: Path, serve) -> None:
    server = ready_gateway(serve)
    run = run_module(tmp_path, check_mode=True, base_url=server.url, model="smollm2", api_key=KEY, wait_sleep=0.1)
    assert run.rc == 0, run.stdout + run.stderr
    assert run.result["changed"] is False
    assert run.result["ready"] is True
    assert run.result["stages"]["models"]["status"] == "ok"
    assert len(server.requests("/smollm2/v1/models")) == 1


def test_check_mode_reports_a_model_that_is_not_ready(tmp_path: Path, serve) -> None:
    server = serve({"/alive": [loading()]})
    run = run_module(tmp_path, check_mode=True, base_url=server.url, model="smollm2", wait_timeout=0)
    assert run.rc == 1
    assert waited(run.result["msg"], "not ready") < 30
    assert '; last readiness answer 503 {"status"' in run.result["msg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"model": "SmolLM2"}, "model must be a DNS label"),
        ({"base_url": "127.0.0.1:8080"}, "base_url must start with http:// or https://"),
        ({"wait_sleep": 0}, "wait_sleep must be > 0, got 0"),
        ({"wait_timeout": -1}, "wait_timeout must be >= 0, got -1"),
        ({"request_timeout": -5}, "request_timeout must be > 0, got -5"),
        ({"completion_max_tokens": 0}, "completion_max_tokens must be >= 1, got 0"),
    ],
)
def test_bad_values_are_refused_before_any_request(tmp_path: Path, args: dict, message: str) -> None:
    module_args = {"base_url": "http://127.0.0.1:9", "model": "smollm2", **args}
    run = run_module(tmp_path, **module_args)
    assert run.rc == 1
    assert message in run.result["msg"]
    assert "stages" not in run.result


def test_through_the_ansible_command_line(tmp_path: Path, serve) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    need(ansible.exists(), f"the ansible command next to {sys.executable}")
    server = ready_gateway(serve)
    module_args = {"base_url": f"{server.url}/smollm2/v1", "model": "smollm2", "api_key": KEY, "wait_sleep": 0.1}
    env = module_env()
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        ANSIBLE_NOCOLOR="true",
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
    )
    # -o: the one-line callback, "localhost | SUCCESS => {...}"
    command = [str(ansible), "localhost", "-c", "local", "--check", "-o", "-m", "llmpods.inference.model_ready"]
    proc = subprocess.run(
        [*command, "-a", json.dumps(module_args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("localhost | "))
    assert line.startswith("localhost | SUCCESS => "), line
    result = json.loads(line.split(" => ", 1)[1])
    assert result["ready"] is True
    assert result["changed"] is False
    assert result["endpoint"] == f"{server.url}/smollm2/v1"
    assert KEY not in proc.stdout
    assert KEY not in proc.stderr
