"""Shared test plumbing: where things are, how to run a playbook, and the CI rule.

Under ``CI=true`` a missing dependency (Docker engine, nginx, Helm, the demo model) fails the test
that needs it; elsewhere it skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STATE = ROOT / ".llmpods"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL = STATE / "models" / DEMO_MODEL_FILE
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CPU_IMAGE = f"llmpods/inference-cpu:{LLAMA_CPP_PYTHON_VERSION}"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# tests/ on sys.path lets test modules share helpers from tests/helpers/.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def need(condition: bool, reason: str) -> None:
    """Skip when a dependency is missing, but fail under CI, where it must be present."""
    if condition:
        return
    if CI:
        pytest.fail(f"missing dependency under CI: {reason}")
    pytest.skip(reason)


def ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".build" / "collections"),
        ANSIBLE_PYTHON_INTERPRETER=str(VENV_BIN / "python"),
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        ANSIBLE_NOCOLOR="true",
        ANSIBLE_FORCE_COLOR="false",
        ANSIBLE_DEPRECATION_WARNINGS="false",
    )
    env.update(extra)
    return env


class PlaybookResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]):
        self.proc = proc
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            self.data = None

    @property
    def stats(self) -> dict:
        """Per-host totals from the json callback (ok, changed, failures, ...)."""
        return (self.data or {}).get("stats", {}).get("localhost", {})

    @property
    def changed(self) -> int:
        return self.stats.get("changed", 0)

    def tasks(self) -> list[dict]:
        """Every task result for localhost: [{'name': ..., 'result': {...}}]."""
        out = []
        for play in (self.data or {}).get("plays", []):
            for task in play.get("tasks", []):
                result = task.get("hosts", {}).get("localhost")
                if result is not None:
                    out.append({"name": task["task"]["name"], "result": result})
        return out

    def failure(self) -> str:
        for task in self.tasks():
            if task["result"].get("failed"):
                return f"{task['name']}: {task['result'].get('msg')}"
        return self.stderr[-3000:] or self.stdout[-3000:]


def run_playbook(
    playbook: str | Path,
    extra_vars: dict | None = None,
    *,
    check: bool = False,
    diff: bool = False,
    env: dict[str, str] | None = None,
    inventory: str | Path = ROOT / "inventory" / "localhost.yml",
    timeout: int = 1800,
) -> PlaybookResult:
    """Run a playbook with the json callback and return its parsed result."""
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=ansible_env(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlaybookResult(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker_ok() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> None:
    need(docker_ok(), "a running Docker engine (`docker info` fails)")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo GGUF, fetched by the collection's own playbook if it is not there yet."""
    if not DEMO_MODEL.exists():
        result = run_playbook(ROOT / "playbooks" / "demo_model.yml")
        assert result.rc == 0, result.failure()
    need(DEMO_MODEL.exists(), f"the demo model at {DEMO_MODEL}")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def cpu_image(docker_engine: None) -> str:
    """The CPU inference image, built by the inference_image role (a no-op when it is already there)."""
    result = run_playbook(ROOT / "playbooks" / "build_images.yml")
    assert result.rc == 0, result.failure()
    return CPU_IMAGE
