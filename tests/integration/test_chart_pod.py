"""The chart's pod on Docker, as a user of the local target sees it: `helm template` with the local target's
settings (the key Secret beside the release), run by the local_pod role; the model answers through the published
gateway with the key, the key shows in no `docker inspect`, a second run changes nothing, a key rotation keeps
the pod, a template change makes a new pod, and containers the pod no longer has are removed.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time

import pytest
import requests
import yaml
from conftest import CPU_IMAGE, DEMO_MODEL, ROOT, VENV_BIN, free_port, need, run_playbook

pytestmark = [pytest.mark.docker, pytest.mark.slow]

POD = "llm-charttest"
CHART = ROOT / "files" / "helm" / "llm-inference"
SECRET = f"{POD}-keys"


def render_gateway_config(tmp_path) -> dict[str, str]:
    """nginx.conf and gateway.js as the gateway role renders them for the model."""
    playbook = tmp_path / "gateway.yml"
    task = {
        "name": "Render",
        "ansible.builtin.include_role": {"name": "llmpods.inference.gateway"},
        "vars": {"gateway_model_name": "smollm2", "gateway_config_dir": str(tmp_path / "gw")},
    }
    playbook.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
    result = run_playbook(playbook)
    assert result.rc == 0, result.failure()
    return {name: (tmp_path / "gw" / name).read_text() for name in ("nginx.conf", "gateway.js")}


class Pod:
    """The chart rendered with some values, and the local_pod role run on it."""

    def __init__(self, tmp_path, port: int):
        self.tmp_path, self.port = tmp_path, port
        config = render_gateway_config(tmp_path)
        self.values = {
            "model": {
                "name": "smollm2",
                "file": DEMO_MODEL.name,
                "source": {"type": "hostPath", "hostPath": {"path": str(DEMO_MODEL.parent)}},
            },
            "gateway": {"config": {"nginxConf": config["nginx.conf"], "gatewayJs": config["gateway.js"]}},
            "apiKeys": {"existingSecret": SECRET, "keys": []},
        }
        self.playbook = tmp_path / "pod.yml"
        task = {
            "name": "Run",
            "ansible.builtin.include_role": {"name": "llmpods.inference.local_pod"},
            # The manifests hold the Secret: they travel as extra vars, never in task args.
            "vars": {
                k: "{{ pod_vars." + k + " }}"
                for k in (
                    "local_pod_name",
                    "local_pod_manifests",
                    "local_pod_state_dir",
                    "local_pod_host_port",
                    "local_pod_state",
                )
            },
        }
        self.playbook.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))

    def manifests(self, keys: list[str], context_size: int) -> list[dict]:
        values = {**self.values, "model": {**self.values["model"], "contextSize": context_size}}
        (self.tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        proc = subprocess.run(
            [str(VENV_BIN / "helm"), "template", POD, str(CHART), "-f", str(self.tmp_path / "values.yaml")],
            capture_output=True,
            text=True,
            check=True,
        )
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": SECRET},
            "stringData": {"api-keys": "".join(f"{key}\n" for key in keys)},
        }
        return [*(doc for doc in yaml.safe_load_all(proc.stdout) if doc), secret]

    def run(self, keys: list[str], context_size: int = 2048, *, state: str = "present", check: bool = False):
        pod_vars = {
            "local_pod_name": POD,
            "local_pod_manifests": self.manifests(keys, context_size) if state == "present" else [],
            "local_pod_state_dir": str(self.tmp_path / "pod"),
            "local_pod_host_port": self.port,
            "local_pod_state": state,
        }
        return run_playbook(self.playbook, {"pod_vars": pod_vars}, check=check)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, bound: float = 300) -> None:
        """Poll the gateway's readiness endpoint, as model_ready does; a generous bound, not a timing."""
        deadline, last = time.monotonic() + bound, None
        while time.monotonic() < deadline:
            try:
                answer = requests.get(self.url("/alive"), timeout=5)
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:200]}"
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(1)
        pytest.fail(f"the pod was not ready through the gateway within {bound} s; last: {last}")

    def status(self, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(self.url("/smollm2/v1/models"), headers=headers, timeout=30).status_code


def containers() -> dict[str, str]:
    """The pod's containers, running or not: name -> id."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=io.llmpods.pod={POD}", "--format", "{{.Names}} {{.ID}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def pod(tmp_path_factory, docker_engine, demo_model, cpu_image):
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    tmp_path = tmp_path_factory.mktemp("chart-pod")
    pod = Pod(tmp_path, free_port())
    pod.key = "sk-test-" + secrets.token_urlsafe(24)
    pod.first = pod.run([pod.key])
    try:
        assert pod.first.rc == 0, pod.first.failure()
        pod.wait_ready()
        yield pod
    finally:
        done = pod.run([], state="absent")
        assert done.rc == 0, done.failure()
        assert containers() == {}
        assert not (tmp_path / "pod").exists()


def test_the_model_answers_through_the_gateway_with_the_key(pod):
    from openai import OpenAI

    client = OpenAI(base_url=pod.url("/smollm2/v1"), api_key=pod.key)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert answer.choices[0].message.content.strip()
    assert pod.status(None) == 401
    assert pod.status("sk-not-the-key-000000000") == 401
    assert sorted(containers()) == [f"{POD}-gateway", f"{POD}-inference", f"{POD}-infra"]


def test_the_key_is_in_no_docker_inspect_and_no_ansible_output(pod):
    for name in containers():
        inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
        assert pod.key not in inspect, f"the key shows in docker inspect {name}"
    assert pod.key not in pod.first.stdout and pod.key not in pod.first.stderr


def test_a_second_run_changes_nothing_in_check_mode_either(pod):
    before = containers()
    check = pod.run([pod.key], check=True)
    assert check.rc == 0, check.failure()
    assert check.changed == 0
    again = pod.run([pod.key])
    assert again.rc == 0, again.failure()
    assert again.changed == 0
    assert containers() == before


def test_a_key_rotation_keeps_the_pod(pod):
    before = containers()
    rotated = "sk-test-" + secrets.token_urlsafe(24)
    result = pod.run([rotated])
    assert result.rc == 0, result.failure()
    assert containers() == before
    assert pod.status(rotated) == 200
    assert pod.status(pod.key) == 401
    pod.key = rotated


def test_containers_the_pod_does_not_have_are_removed(pod):
    before = containers()
    stray = f"{POD}-stray"
    subprocess.run(
        ["docker", "create", "--name", stray, "--label", f"io.llmpods.pod={POD}", CPU_IMAGE, "true"],
        capture_output=True,
        check=True,
    )
    result = pod.run([pod.key])
    assert result.rc == 0, result.failure()
    assert result.changed == 1
    assert containers() == before


def test_a_template_change_makes_a_new_pod(pod):
    before = containers()
    result = pod.run([pod.key], context_size=1024)
    assert result.rc == 0, result.failure()
    after = containers()
    assert sorted(after) == sorted(before)
    assert not set(after.values()) & set(before.values()), "every container of the pod is new"
    inspect = json.loads(
        subprocess.run(["docker", "inspect", f"{POD}-inference"], capture_output=True, check=True).stdout
    )[0]
    assert "N_CTX=1024" in inspect["Config"]["Env"]
    assert inspect["Config"]["Image"] == CPU_IMAGE
    pod.wait_ready()
    assert pod.status(pod.key) == 200


def test_what_the_chart_never_renders_fails_before_any_change(tmp_path, docker_engine, demo_model):
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    pod = Pod(tmp_path, free_port())
    manifests = pod.manifests(["sk-test-" + secrets.token_urlsafe(24)], 2048)
    deployment = next(doc for doc in manifests if doc["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][1]["envFrom"] = [{"configMapRef": {"name": "extra"}}]
    pod_vars = {
        "local_pod_name": f"{POD}-refused",
        "local_pod_manifests": manifests,
        "local_pod_state_dir": str(tmp_path / "pod"),
        "local_pod_host_port": pod.port,
        "local_pod_state": "present",
    }
    result = run_playbook(pod.playbook, {"pod_vars": pod_vars})
    assert result.rc != 0
    assert "pod_plan: envFrom is not supported (container gateway)" in result.stdout, result.failure()
    assert result.changed == 0
    assert not (tmp_path / "pod").exists()
