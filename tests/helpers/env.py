"""Where things are and how to run them: shared by the tests (through conftest) and by bench/.

Nothing here knows about pytest: a benchmark imports it as it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STATE = ROOT / ".llmpods"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL = STATE / "models" / DEMO_MODEL_FILE
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CPU_IMAGE = f"llmpods/inference-cpu:{LLAMA_CPP_PYTHON_VERSION}"


def plugin(kind: str, name: str) -> ModuleType:
    """The collection's plugin file ``plugins/<kind>/<name>.py``, imported as a module (without Ansible's loader)."""
    # Plugins import the collection's module_utils: make the collection importable first.
    importlib.import_module("helpers.gateway_stub")
    spec = importlib.util.spec_from_file_location(f"llmpods_{kind}_{name}", ROOT / "plugins" / kind / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


class PlaybookOutputError(AssertionError):
    """The playbook's output is not what the json callback writes, so nothing about the run can be checked."""


class PlaybookResult:
    """A playbook run with the json callback. Reading its stats or tasks fails the test when the output cannot
    be parsed or holds no localhost stats, so ``changed == 0`` can never pass on output that was not read."""

    def __init__(self, proc: subprocess.CompletedProcess[str]):
        self.proc = proc
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self._error = ""
        try:
            self._data = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            self._data, self._error = None, f"stdout is not JSON ({exc})"
        else:
            if not isinstance(self._data, dict) or "localhost" not in self._data.get("stats", {}):
                self._error = "the json callback's stats have no entry for localhost"

    def _unreadable(self) -> PlaybookOutputError:
        return PlaybookOutputError(
            f"playbook output cannot be checked: {self._error}; rc={self.rc}\n"
            f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"
        )

    @property
    def data(self) -> dict:
        if self._error:
            raise self._unreadable()
        return self._data

    @property
    def stats(self) -> dict:
        """Per-host totals from the json callback (ok, changed, failures, ...)."""
        return self.data["stats"]["localhost"]

    @property
    def changed(self) -> int:
        return self.stats["changed"]

    def tasks(self) -> list[dict]:
        """Every task result for localhost: [{'name': ..., 'result': {...}}]."""
        out = []
        for play in self.data.get("plays", []):
            for task in play.get("tasks", []):
                result = task.get("hosts", {}).get("localhost")
                if result is not None:
                    out.append({"name": task["task"]["name"], "result": result})
        return out

    def failure(self) -> str:
        """What went wrong, for an assertion message: the failed task, else the end of the output."""
        if not self._error:
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
    args: Sequence[str] = (),
) -> PlaybookResult:
    """Run a playbook with the json callback and return its parsed result (``args``: more command line)."""
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *args]
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
