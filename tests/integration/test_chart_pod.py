"""The chart's pod runs for real: `helm template` with test values, then its Deployment, ConfigMap and Secret
run on Docker by the local_pod role, the probes run the way the kubelet runs them, and a chat completion
with a key from the rendered Secret goes through the published gateway port.
"""

from __future__ import annotations

import base64
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


def render_gateway_config(tmp_path) -> dict[str, str]:
    """nginx.conf and gateway.js as the gateway role renders them for the model."""
    playbook = tmp_path / "gateway.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Render the gateway config",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Render",
                            "ansible.builtin.include_role": {"name": "llmpods.inference.gateway"},
                            "vars": {"gateway_model_name": "smollm2", "gateway_config_dir": str(tmp_path / "gw")},
                        }
                    ],
                }
            ]
        )
    )
    result = run_playbook(playbook)
    assert result.rc == 0, result.failure()
    return {name: (tmp_path / "gw" / name).read_text() for name in ("nginx.conf", "gateway.js")}


def helm_template(tmp_path, key: str) -> list[dict]:
    config = render_gateway_config(tmp_path)
    values = {
        "model": {
            "name": "smollm2",
            "file": DEMO_MODEL.name,
            "source": {"type": "hostPath", "hostPath": {"path": str(DEMO_MODEL.parent)}},
        },
        "gateway": {"config": {"nginxConf": config["nginx.conf"], "gatewayJs": config["gateway.js"]}},
        "apiKeys": {"keys": [key]},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    proc = subprocess.run(
        [str(VENV_BIN / "helm"), "template", POD, str(CHART), "-f", str(tmp_path / "values.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)}"
    return found[0]


def probe_like_kubelet(url: str, probe: dict) -> tuple[int, float]:
    """Poll as the kubelet does; return (attempts, seconds) until success, or fail after failureThreshold misses."""
    period = probe.get("periodSeconds", 10)
    timeout = probe.get("timeoutSeconds", 1)
    threshold = probe.get("failureThreshold", 3)
    time.sleep(probe.get("initialDelaySeconds", 0))
    start = time.monotonic()
    last = None
    for attempt in range(1, threshold + 1):
        try:
            answer = requests.get(url, timeout=timeout)
            last = f"{answer.status_code} {answer.text[:200]}"
            if 200 <= answer.status_code < 400:
                return attempt, time.monotonic() - start
        except requests.RequestException as exc:
            last = repr(exc)
        time.sleep(period)
    pytest.fail(f"probe {url} failed {threshold} times every {period} s; last: {last}")


@pytest.fixture
def chart_pod(tmp_path, docker_engine, demo_model, cpu_image):
    need((VENV_BIN / "helm").exists(), "helm in the virtual environment (make helm)")
    key = "sk-test-" + secrets.token_urlsafe(24)
    docs = helm_template(tmp_path, key)
    port = free_port()
    run_vars = {
        "local_pod_name": POD,
        "local_pod_manifests": [one(docs, k) for k in ("Deployment", "ConfigMap", "Secret", "Service")],
        "local_pod_state_dir": str(tmp_path / "pod"),
        "local_pod_host_port": port,
        # The test runs the probes itself, below.
        "local_pod_wait": False,
    }
    playbook = tmp_path / "pod.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Run the chart's pod",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Run",
                            "ansible.builtin.include_role": {"name": "llmpods.inference.local_pod"},
                            # The manifests hold the Secret: they travel as extra vars, never in task args.
                            "vars": {k: "{{ pod_vars." + k + " }}" for k in [*run_vars, "local_pod_state"]},
                        }
                    ],
                }
            ]
        )
    )
    result = run_playbook(playbook, {"pod_vars": {**run_vars, "local_pod_state": "present"}})
    try:
        assert result.rc == 0, result.failure()
        yield {"docs": docs, "port": port, "result": result, "key": key}
    finally:
        done = run_playbook(
            playbook, {"pod_vars": {**run_vars, "local_pod_manifests": [], "local_pod_state": "absent"}}
        )
        assert done.rc == 0, done.failure()


def test_chart_pod_serves_a_completion_with_a_key_from_the_rendered_secret(chart_pod):
    docs, port = chart_pod["docs"], chart_pod["port"]
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    gateway = next(c for c in spec["containers"] if c["name"] == "gateway")
    named = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    published = named["http"]

    def url(probe):
        get = probe["httpGet"]
        assert named.get(get["port"], get["port"]) == published, "the probes go to the published gateway port"
        return f"http://127.0.0.1:{port}{get['path']}"

    probe_like_kubelet(url(gateway["startupProbe"]), gateway["startupProbe"])
    probe_like_kubelet(url(gateway["readinessProbe"]), gateway["readinessProbe"])
    probe_like_kubelet(url(gateway["livenessProbe"]), gateway["livenessProbe"])

    secret = one(docs, "Secret")
    key = base64.b64decode(secret["data"]["api-keys"]).decode().splitlines()[0]
    assert key == chart_pod["key"]

    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/smollm2/v1", api_key=key)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert answer.choices[0].message.content.strip()
    assert requests.get(f"http://127.0.0.1:{port}/smollm2/v1/models", timeout=10).status_code == 401


def test_the_key_stays_in_the_secret(chart_pod):
    key = chart_pod["key"]
    configmap = one(chart_pod["docs"], "ConfigMap")
    assert key not in json.dumps(configmap)
    deployment = one(chart_pod["docs"], "Deployment")
    assert key not in json.dumps(deployment)
    for name in (f"{POD}-gateway", f"{POD}-inference", f"{POD}-infra"):
        inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
        assert key not in inspect, f"the key shows in docker inspect {name}"
    result = chart_pod["result"]
    assert key not in result.stdout and key not in result.stderr


def test_pod_containers_follow_the_pod_spec(chart_pod):
    spec = one(chart_pod["docs"], "Deployment")["spec"]["template"]["spec"]
    for container in spec["containers"]:
        inspect = json.loads(
            subprocess.run(["docker", "inspect", f"{POD}-{container['name']}"], capture_output=True, check=True).stdout
        )[0]
        sc = container["securityContext"]
        assert inspect["Config"]["User"] == f"{sc['runAsUser']}:{sc['runAsGroup']}"
        assert inspect["HostConfig"]["ReadonlyRootfs"] is sc["readOnlyRootFilesystem"]
        assert inspect["HostConfig"]["CapDrop"] == ["ALL"]
        assert inspect["HostConfig"]["NetworkMode"].startswith("container:")
        assert container["image"] == inspect["Config"]["Image"]
        env = dict(e.split("=", 1) for e in inspect["Config"]["Env"])
        for item in container.get("env", []):
            if "value" in item:
                assert env[item["name"]] == item["value"]
    assert CPU_IMAGE in [c["image"] for c in spec["containers"]]
