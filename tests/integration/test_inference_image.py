"""The inference image for real: built by the role, run on Docker with the demo model, pushed to a registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from conftest import CPU_IMAGE, DEMO_MODEL_FILE, LLAMA_CPP_PYTHON_VERSION, free_port, need, run_playbook
from helpers.gateway import llama_server_env
from helpers.sse import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ALIAS = "smollm2"
TARGETS = "cpu, cuda, rocm, vulkan"
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, and say why you like it."},
    ],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "Tell me a fact about the Moon."},
    ],
]
# A prompt the model keeps answering past the token limit, so every stream ends on "length".
LONG_ANSWER = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def image_id(ref: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def role_playbook(tmp_path: Path, **role_vars: object) -> Path:
    """A one-task playbook that applies the role with the given vars."""
    play = [
        {
            "name": "Apply inference_image",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Apply the inference_image role",
                    "ansible.builtin.include_role": {"name": "llmpods.inference.inference_image"},
                    "vars": role_vars,
                }
            ],
        }
    ]
    path = tmp_path / f"play-{uuid.uuid4().hex[:8]}.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return path


def role_task(result, name: str) -> dict | None:
    """The result of the role's task called ``name`` (the json callback prefixes the role)."""
    return next((t["result"] for t in result.tasks() if t["name"].split(" : ", 1)[-1] == name), None)


def build_ran(result) -> bool:
    build = role_task(result, "Build the inference image")
    return build is not None and not build.get("skipped")


@pytest.fixture(scope="module")
def built_image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU image, built by the role (a cache hit when nothing changed)."""
    result = run_playbook(role_playbook(tmp_path_factory.mktemp("role"), inference_image_target="cpu"))
    assert result.rc == 0, result.failure()
    assert image_id(CPU_IMAGE), f"{CPU_IMAGE} was not built"
    return CPU_IMAGE


# ---- the role


def test_role_is_idempotent_and_checkable(built_image: str, tmp_path: Path) -> None:
    before = image_id(built_image)
    second = run_playbook(role_playbook(tmp_path, inference_image_target="cpu"))
    assert second.rc == 0, second.failure()
    assert second.changed == 0, [t["name"] for t in second.tasks() if t["result"].get("changed")]
    checked = run_playbook(role_playbook(tmp_path, inference_image_target="cpu"), check=True, diff=True)
    assert checked.rc == 0, checked.failure()
    assert checked.changed == 0, [t["name"] for t in checked.tasks() if t["result"].get("changed")]
    assert image_id(built_image) == before


def test_check_mode_reports_a_missing_image_and_builds_nothing(built_image: str, tmp_path: Path) -> None:
    missing = "0.0.1"  # a version never built
    ref = f"llmpods/inference-cpu:{missing}"
    assert image_id(ref) is None
    checked = run_playbook(role_playbook(tmp_path, inference_image_version=missing), check=True)
    assert checked.rc == 0, checked.failure()
    build = role_task(checked, "Build the inference image")
    assert build is not None and build.get("changed") is True, build
    assert image_id(ref) is None, "check mode built nothing"


@pytest.mark.parametrize(
    ("role_vars", "expected"),
    [
        ({"inference_image_target": "tpu"}, TARGETS),
        ({"inference_image_version": "latest"}, "MAJOR.MINOR.PATCH"),
        ({"inference_image_version": "0.3"}, "MAJOR.MINOR.PATCH"),
        ({"inference_image_push": True}, "inference_image_push needs it set"),
    ],
    ids=["target", "version-word", "version-short", "push-without-registry"],
)
def test_bad_input_fails_before_building(docker_engine: None, tmp_path: Path, role_vars: dict, expected: str) -> None:
    result = run_playbook(role_playbook(tmp_path, **role_vars))
    assert result.rc != 0
    assert expected in result.failure()
    assert not build_ran(result)
    assert not any(" : Stage " in t["name"] for t in result.tasks()), "nothing is staged either"


def test_image_metadata(built_image: str) -> None:
    info = json.loads(docker("image", "inspect", built_image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python3", "-m", "llmpods_server"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["INTERRUPT_REQUESTS"] == "false"
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    assert "PIP_CERT" not in env
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Labels"]["org.opencontainers.image.version"] == LLAMA_CPP_PYTHON_VERSION


def test_build_ca_bundle_is_not_in_the_runtime_image(built_image: str) -> None:
    found = docker(
        "run", "--rm", "--entrypoint", "find", built_image, "/", "-xdev",
        "(", "-name", "ca-bundle.crt", "-o", "-path", "/opt/build-ca", ")", "-print",
        check=False,
    )  # fmt: skip
    assert found.stdout.strip() == ""
    toolchain = docker("run", "--rm", "--entrypoint", "sh", built_image, "-c", "command -v gcc cmake || true")
    assert toolchain.stdout.strip() == "", "no compilers in the runtime image"


def test_both_backends_load_the_same_llama_cpp(built_image: str) -> None:
    """llama-server (on PATH, as the chart starts it) loads llama.cpp and ggml from the llama-cpp-python package's
    own library directory: one build of llama.cpp serves both backends, and nothing it needs is missing."""
    script = (
        "import pathlib, llama_cpp; print(pathlib.Path(llama_cpp.__file__).parent / 'lib'); "
        "import shutil; print(shutil.which('llama-server'))"
    )
    lib_dir, server = docker("run", "--rm", "--entrypoint", "python3", built_image, "-c", script).stdout.split()
    ldd = docker("run", "--rm", "--entrypoint", "ldd", built_image, server).stdout
    lines = [line.split() for line in ldd.splitlines()]
    resolved = {parts[0]: parts[2] for parts in lines if len(parts) > 2 and parts[1] == "=>"}
    assert "not found" not in ldd, ldd
    llama_libs = {name: path for name, path in resolved.items() if name.startswith(("libllama.", "libggml"))}
    assert {"libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"} <= set(llama_libs), ldd
    assert {os.path.normpath(Path(path).parent) for path in llama_libs.values()} == {lib_dir}, ldd
    version = docker("run", "--rm", "--entrypoint", "llama-server", built_image, "--version", check=False)
    assert version.returncode == 0 and "version:" in version.stdout + version.stderr, version


# ---- the running server


# How the chart starts each backend of the image (deployment.yaml): the entrypoint and its environment.
BACKEND_RUN = {
    "llama-cpp-python": [
        "-e", f"MODEL=/models/{DEMO_MODEL_FILE}", "-e", f"MODEL_ALIAS={ALIAS}", "-e", "N_THREADS=2",
    ],
    "llama-server": [
        "--entrypoint", "llama-server",
        *(arg for name, value in llama_server_env(
            f"/models/{DEMO_MODEL_FILE}", ALIAS, "0.0.0.0", 8000).items() for arg in ("-e", f"{name}={value}")),
    ],
}  # fmt: skip
# The tokenizer routes and the lock-free probe are llama-cpp-python's own; for llama-server the gateway answers the
# same routes (tests/integration/test_gateway.py runs those against both).
LLAMA_CPP_PYTHON_ONLY = pytest.mark.parametrize("running", ["llama-cpp-python"], indirect=True)


@pytest.fixture(scope="module", params=list(BACKEND_RUN))
def running(built_image: str, demo_model: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(base URL, container name) of the image serving the demo model with one of its backends."""
    port = free_port()
    name = f"llmpods-test-inference-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{demo_model.parent}:/models:ro",
        *BACKEND_RUN[request.param],
        built_image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # llama-server lists the model before it is loaded; its /health waits for the load.
    ready_path = "/health" if request.param == "llama-server" else "/v1/models"
    try:
        deadline = time.monotonic() + 120
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"{url}{ready_path}", timeout=5)
                if response.ok and (
                    request.param == "llama-server" or any(m["id"] == ALIAS for m in response.json()["data"])
                ):
                    break
                last = f"{response.status_code} {response.text[:200]}"
            except requests.ConnectionError as exc:
                last = str(exc)
            if docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
                pytest.fail(f"container exited: {docker('logs', name, check=False).stderr[-2000:]}")
            time.sleep(1)
        else:
            pytest.fail(f"{ALIAS} not listed after 120 s; last answer {last}")
        yield url, name
    finally:
        docker("rm", "-f", name, check=False)


def test_a_stop_while_the_model_loads_is_not_lost(built_image: str, demo_model: Path) -> None:
    """The server is the container's PID 1, which gets only the signals it handles. A SIGTERM sent before it serves
    (a pod deleted while it loads: a scale to zero, a rollout) must stop it then, not be lost until the kubelet's
    SIGKILL at the end of the grace period. (llama-server, which installs its handler only once it serves, still
    loses it: see the changelog.)"""
    name = f"llmpods-test-stop-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "-d", "--name", name, "-v", f"{demo_model.parent}:/models:ro",
        *BACKEND_RUN["llama-cpp-python"], built_image,
    )  # fmt: skip
    try:
        pid = int(docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
        deadline = time.monotonic() + 30
        caught = 0
        while time.monotonic() < deadline and not caught & (1 << (signal.SIGTERM - 1)):
            status = Path(f"/proc/{pid}/status").read_text()
            caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
            time.sleep(0.01)
        docker("kill", "--signal", "TERM", name)
        stopped = time.monotonic()
        while docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true":
            assert time.monotonic() - stopped < 60, "the server did not stop within 60 s of a SIGTERM"
            time.sleep(0.2)
        logs = docker("logs", name, check=False)
        assert "Uvicorn running" not in logs.stdout + logs.stderr, "the stop came while it served: test nothing"
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def server(running: tuple[str, str]) -> str:
    return running[0]


@pytest.fixture(scope="module")
def container(running: tuple[str, str]) -> str:
    return running[1]


def chat(url: str, messages: list[dict], **extra: object) -> dict:
    body = {"model": ALIAS, "messages": messages, "temperature": 0, "max_tokens": 16, **extra}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream_chat(url: str, messages: list[dict], max_tokens: int, on_chunk=None) -> tuple[str, int, str | None]:
    """Content, number of content chunks and the final finish_reason of a streamed chat completion.

    ``on_chunk(n)`` is called after the n-th content chunk arrived."""
    body = {"model": ALIAS, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    content, chunks, finish = "", 0, None
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        done = False
        for event in stream_events(response.iter_lines(decode_unicode=True)):
            if event == "[DONE]":
                done = True
                break
            choice = event["choices"][0]
            piece = choice["delta"].get("content")
            if piece:
                content += piece
                chunks += 1
                if on_chunk:
                    on_chunk(chunks)
            finish = choice.get("finish_reason") or finish
        assert done, "stream ended without [DONE]"
    return content, chunks, finish


def test_runs_as_uid_10001(container: str) -> None:
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4


def test_models_lists_the_alias(server: str) -> None:
    data = requests.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in data["data"]] == [ALIAS]


def test_metrics_count_the_tokens(server: str) -> None:
    """Both backends answer /metrics in the Prometheus text format with llama-server's names (llamacpp:...), and a
    chat completion adds its usage to the token counters."""

    def counters() -> dict[str, float]:
        response = requests.get(f"{server}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        values = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _unused, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = counters()
    usage = chat(server, CONVERSATIONS[0], max_tokens=8)["usage"]
    after = counters()
    assert (
        after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
        == usage["completion_tokens"]
    )
    assert after["llamacpp:prompt_tokens_total"] > before["llamacpp:prompt_tokens_total"]
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:requests_deferred"] == 0


def test_chat_completion(server: str) -> None:
    answer = chat(server, CONVERSATIONS[0])
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["prompt_tokens"] > 0
    assert 0 < answer["usage"]["completion_tokens"] <= 16


def test_streamed_chat_matches_plain(server: str) -> None:
    plain = chat(server, LONG_ANSWER, max_tokens=24)
    assert plain["usage"]["completion_tokens"] == 24
    content, chunks, finish = stream_chat(server, LONG_ANSWER, 24)
    assert finish == plain["choices"][0]["finish_reason"] == "length"
    assert chunks == 24, "one chunk per generated token"
    # Greedy decoding; the KV-cache reuse between requests can still flip a near-tie late in a long answer.
    assert content[:40] == plain["choices"][0]["message"]["content"][:40]


def test_completion(server: str) -> None:
    body = {"model": ALIAS, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    answer = requests.post(f"{server}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] <= 8


@LLAMA_CPP_PYTHON_ONLY
def test_tokenize_detokenize(server: str) -> None:
    text = "Tokens, please: one two three."
    tokens = requests.post(f"{server}/extras/tokenize", json={"input": text}, timeout=10).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = requests.post(f"{server}/extras/detokenize", json={"tokens": tokens}, timeout=10).json()["text"]
    assert back.strip() == text


@LLAMA_CPP_PYTHON_ONLY
@pytest.mark.parametrize("text", ["Hello", "How many tokens in this query?", "naïve café — ünïcödé ✓", ""])
def test_count_of_input_is_tokenize_length(server: str, text: str) -> None:
    tokens = requests.post(f"{server}/extras/tokenize", json={"input": text}, timeout=10).json()["tokens"]
    count = requests.post(f"{server}/extras/tokenize/count", json={"input": text}, timeout=10).json()
    assert count == {"count": len(tokens)}


@LLAMA_CPP_PYTHON_ONLY
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system-user", "multi-turn", "user-assistant-user"])
def test_count_of_chat_is_usage_prompt_tokens(server: str, messages: list[dict]) -> None:
    request = {"model": ALIAS, "messages": messages, "temperature": 0, "max_tokens": 1}
    count = requests.post(f"{server}/extras/tokenize/count", json=request, timeout=30)
    assert count.status_code == 200, count.text
    assert count.json()["count"] == chat(server, messages, max_tokens=1)["usage"]["prompt_tokens"]


def test_concurrent_streams_all_finish(server: str) -> None:
    max_tokens = 64
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: stream_chat(server, LONG_ANSWER, max_tokens), range(4)))
    # Each stream carries the whole answer (one chunk per token): none was cut short by the others.
    for content, chunks, finish in results:
        assert (chunks, finish) == (max_tokens, "length")
        assert content.startswith(results[0][0][:40])


@LLAMA_CPP_PYTHON_ONLY
def test_health_probe_does_not_interrupt_a_stream(server: str) -> None:
    max_tokens = 96
    started, received = threading.Event(), []
    with ThreadPoolExecutor(max_workers=1) as pool:
        streaming = pool.submit(
            stream_chat, server, LONG_ANSWER, max_tokens, lambda n: (received.append(n), started.set())
        )
        assert started.wait(120), "the stream started"
        sent_at = len(received)
        probe = requests.get(f"{server}/v1/models", timeout=300)
        _unused, chunks, finish = streaming.result()
    assert probe.ok
    # The probe went out while the stream was running (llama-cpp-python answers /v1/models only once the
    # generation lets go of the model lock, which is why the gateway's readiness check uses another path).
    assert 1 <= sent_at < max_tokens, sent_at
    assert (chunks, finish) == (max_tokens, "length")


# ---- the registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    need(Path(binary).exists(), "Debian's docker-registry (/usr/bin/docker-registry)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}, "delete": {"enabled": True}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _unused in range(50):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        else:
            pytest.fail("docker-registry did not answer on /v2/")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_push_to_registry_without_rebuilding(built_image: str, registry: str, tmp_path: Path) -> None:
    local_id = image_id(built_image)
    remote = f"{registry}/llmpods/inference-cpu:{LLAMA_CPP_PYTHON_VERSION}"
    playbook = role_playbook(tmp_path, inference_image_registry=registry, inference_image_push=True)
    try:
        pushed = run_playbook(playbook)
        assert pushed.rc == 0, pushed.failure()
        build = role_task(pushed, "Build the inference image")
        assert build is not None and not build.get("changed"), "the existing image is tagged, not rebuilt"
        assert image_id(remote) == local_id
        tags = requests.get(f"http://{registry}/v2/llmpods/inference-cpu/tags/list", timeout=10).json()
        assert tags["tags"] == [LLAMA_CPP_PYTHON_VERSION]

        again = run_playbook(playbook)
        assert again.rc == 0, again.failure()
        assert again.changed == 0, [t["name"] for t in again.tasks() if t["result"].get("changed")]

        docker("rmi", remote)
        assert image_id(remote) is None
        docker("pull", remote)
        assert image_id(remote) == local_id
    finally:
        docker("rmi", remote, check=False)
