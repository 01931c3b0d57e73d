"""The CI rule and the shared fixtures; where things are and how to run a playbook live in helpers/env.py
(re-exported here, and imported by bench/).

Under ``CI=true`` a missing dependency (Docker engine, nginx, Helm, the demo model) fails the test
that needs it; elsewhere it skips with the reason. Under ``CI=true`` no test skips at all: a hook below turns any
skip, whatever raised it, into a failure.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# tests/ on sys.path lets test modules share helpers from tests/helpers/.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Re-exported: test modules import these from conftest.
from helpers.env import (  # noqa: E402
    CPU_IMAGE,
    DEMO_MODEL,
    DEMO_MODEL_FILE,
    LLAMA_CPP_PYTHON_VERSION,
    ROOT,
    STATE,
    VENV_BIN,
    PlaybookOutputError,
    PlaybookResult,
    ansible_env,
    docker_ok,
    free_port,
    run_playbook,
)

__all__ = [
    "CI",
    "CPU_IMAGE",
    "DEMO_MODEL",
    "DEMO_MODEL_FILE",
    "LLAMA_CPP_PYTHON_VERSION",
    "ROOT",
    "STATE",
    "VENV_BIN",
    "PlaybookOutputError",
    "PlaybookResult",
    "ansible_env",
    "docker_ok",
    "free_port",
    "need",
    "need_collection",
    "need_module",
    "run_playbook",
]


def need(condition: bool, reason: str) -> None:
    """Skip when a dependency is missing, but fail under CI, where it must be present."""
    if condition:
        return
    if CI:
        pytest.fail(f"missing dependency under CI: {reason}")
    pytest.skip(reason, allow_module_level=True)


def need_collection() -> None:
    """The collection where Ansible finds it (`make collection`), under the need() rule."""
    need(
        (ROOT / ".build/collections/ansible_collections/llmpods/inference").exists(), "the collection (make collection)"
    )


def need_module(name: str, reason: str) -> ModuleType:
    """Import a module the test needs, under the need() rule (usable at module level)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        need(False, f"{reason} ({exc})")
        raise  # not reached: need() skips or fails


def _skip_fails_under_ci(report) -> None:
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where no test may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip of a test (a marker, a fixture, pytest.skip anywhere) is a failure."""
    outcome = yield
    _skip_fails_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected."""
    outcome = yield
    _skip_fails_under_ci(outcome.get_result())


@pytest.fixture(scope="session")
def docker_engine() -> None:
    need(docker_ok(), "a running Docker engine (`docker info` fails)")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo GGUF, fetched by the collection's own playbook (`make model`) if it is not there yet."""
    if not DEMO_MODEL.exists():
        result = run_playbook(ROOT / "playbooks" / "fetch_models.yml")
        assert result.rc == 0, result.failure()
    need(DEMO_MODEL.exists(), f"the demo model at {DEMO_MODEL}")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def cpu_image(docker_engine: None) -> str:
    """The CPU inference image, built by the inference_image role (a no-op when it is already there)."""
    result = run_playbook(ROOT / "playbooks" / "build_images.yml")
    assert result.rc == 0, result.failure()
    return CPU_IMAGE
