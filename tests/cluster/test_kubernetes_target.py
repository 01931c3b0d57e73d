"""The Kubernetes target on a real cluster (`make cluster`): deploy, scale to zero and back, undeploy.

Every request takes the path a user's does: the Ingress controller (Traefik, NodePort) -> the Ingress made by
keda_ingress -> the KEDA HTTP add-on interceptor -> the model's Service -> the gateway -> the inference server.
The tests run in file order and share one release: each step starts from where the previous one left it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import DEMO_MODEL_FILE, ROOT, STATE, VENV_BIN, ansible_env, need, run_playbook
from helpers.sse import stream_events

NAMESPACE = "llmpods-cluster-test"
MODEL = "smollm2"
RELEASE = f"llm-{MODEL}"
HOST = "smollm2.llmpods.test"
# Short enough to watch the model go back to zero within a test, long enough for the steps in between.
SCALEDOWN_PERIOD = 45
# Scale to zero: the cooldown, then KEDA's polling interval (30 s) and the pod's termination.
ZERO_WITHIN = SCALEDOWN_PERIOD + 150


def read_cluster_env() -> dict[str, str]:
    data = Path(os.environ.get("LLMPODS_CLUSTER_DATA", "/var/lib/llmpods-cluster"))
    env_file = data / "cluster.env"
    need(env_file.exists(), f"a running test cluster (`make cluster` writes {env_file})")
    out = {}
    for line in env_file.read_text().splitlines():
        key, value = line.split("=", 1)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    env = read_cluster_env()
    probe = subprocess.run(
        [env["LLMPODS_CLUSTER_KUBECTL"], "--kubeconfig", env["KUBECONFIG"], "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        check=False,
    )
    need(probe.returncode == 0, f"the test cluster's API server answering /readyz ({probe.stderr.strip()})")
    return env


def kubectl(cluster: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [cluster["LLMPODS_CLUSTER_KUBECTL"], "--kubeconfig", cluster["KUBECONFIG"], *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc


def kget(cluster: dict[str, str], *args: str) -> dict[str, Any]:
    return json.loads(kubectl(cluster, "get", "-o", "json", *args).stdout)


def helm(cluster: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    binary = VENV_BIN / "helm"
    need(binary.exists(), f"Helm 3 at {binary} (`make helm`)")
    return subprocess.run(
        [str(binary), "--kubeconfig", cluster["KUBECONFIG"], *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def release_vars(
    cluster: dict[str, str], namespace: str, host: str, state_dir: Path, model: dict[str, Any], **settings: Any
) -> dict[str, Any]:
    """Extra vars of deploy.yml for the demo model on this cluster, behind its Ingress controller: the model entry
    adds to (or replaces) the demo's catalog fields, settings to the playbook's."""
    return {
        "llmpods_target": "kubernetes",
        "llmpods_kubeconfig": cluster["KUBECONFIG"],
        "llmpods_namespace": namespace,
        "llmpods_registry": cluster["LLMPODS_CLUSTER_REGISTRY"],
        "llmpods_push": True,
        "llmpods_ingress": True,
        "llmpods_ingress_host": host,
        "llmpods_base_url": cluster["LLMPODS_CLUSTER_INGRESS"],
        "llmpods_helm_binary": str(VENV_BIN / "helm"),
        "llmpods_state_dir": str(state_dir),
        "llmpods_models_dir": str(STATE / "models"),
        "llmpods_wait_timeout": 600,
        **settings,
        "llmpods_models": [
            {
                "name": MODEL,
                "file": DEMO_MODEL_FILE,
                "target": "cpu",
                # The node is this machine: the model directory of the checkout is the node's directory.
                "host_path": str(STATE / "models"),
                "replicas": {"min": 0, "max": 1},
                "context_size": 2048,
                # The cluster tests run side by side on a node of 2 CPUs: each model asks for a tenth of one, and
                # may use both.
                "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                **model,
            }
        ],
    }


def deploy_vars(cluster: dict[str, str], chart_dir: Path | None = None) -> dict[str, Any]:
    return release_vars(
        cluster,
        NAMESPACE,
        HOST,
        STATE / "cluster-test",
        {"scaledown_period": SCALEDOWN_PERIOD},
        llmpods_chart_dir=str(chart_dir or ROOT / "files" / "helm" / "llm-inference"),
    )


def api_key() -> str:
    return (STATE / "cluster-test" / "keys" / f"{MODEL}.keys").read_text().splitlines()[0].strip()


def url(cluster: dict[str, str], path: str) -> str:
    return f"{cluster['LLMPODS_CLUSTER_INGRESS']}/{MODEL}{path}"


def headers(key: str | None = None) -> dict[str, str]:
    out = {"Host": HOST, "Content-Type": "application/json"}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def replicas(cluster: dict[str, str], namespace: str = NAMESPACE) -> tuple[int, int]:
    """(spec.replicas of the Deployment, pods of the release that are not being deleted).

    A pod being deleted is no replica: it serves nothing (it left the Service's endpoints). This cluster's kubelet
    keeps one that was deleted as it started (the Deployment's first pod, which KEDA scales to zero right after the
    install) until its grace period ends, without a SIGTERM; waiting on it would wait on that, not on KEDA."""
    deployment = kget(cluster, "-n", namespace, f"deployment/{RELEASE}")
    pods = kget(cluster, "-n", namespace, "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    live = [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]
    return deployment["spec"].get("replicas", 1), len(live)


def wait_for_zero(cluster: dict[str, str]) -> float:
    start = time.monotonic()
    seen = None
    while time.monotonic() - start < ZERO_WITHIN:
        seen = replicas(cluster)
        if seen == (0, 0):
            return time.monotonic() - start
        time.sleep(3)
    pytest.fail(f"the model did not scale to zero within {ZERO_WITHIN} s of no traffic: (replicas, pods) = {seen}")


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def deployed(cluster: dict[str, str], demo_model: Path) -> dict[str, Any]:
    need(shutil.which("docker") is not None, "the docker client, to build and push the images")
    extra = deploy_vars(cluster)
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", extra, timeout=3600)
    assert result.data is not None, f"the playbook printed no JSON result: {result.stderr[-2000:]}"
    assert result.rc == 0, result.failure()
    return {"vars": extra, "result": result}


def test_deploy_installs_the_release_with_helm(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    status = helm(cluster, "status", RELEASE, "-n", NAMESPACE, "-o", "json")
    assert status.returncode == 0, status.stderr
    release = json.loads(status.stdout)
    assert release["info"]["status"] == "deployed"
    routes = kget(cluster, "-n", NAMESPACE, "ingress")["items"]
    assert [r["spec"]["rules"][0]["host"] for r in routes] == [HOST]
    summary = json.loads((STATE / "cluster-test" / "deploy.json").read_text())
    assert summary["base_url"] == f"{cluster['LLMPODS_CLUSTER_INGRESS']}/{MODEL}/v1"


def test_helm_test_passes(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    # The deploy woke the model (model_ready through the interceptor): one pod answers until the cooldown.
    result = helm(cluster, "test", RELEASE, "-n", NAMESPACE, "--timeout", "5m")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Phase:          Succeeded" in result.stdout


def test_request_without_key_gets_4xx_and_no_model_output(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
    response = requests.post(url(cluster, "/v1/chat/completions"), headers=headers(), json=body, timeout=600)
    assert 400 <= response.status_code < 500, response.text
    assert "choices" not in response.text


def test_300_token_stream_arrives_whole(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    chunks, finish, done = 0, None, False
    with requests.post(
        url(cluster, "/v1/chat/completions"), headers=headers(api_key()), json=body, stream=True, timeout=600
    ) as response:
        assert response.status_code == 200, response.text
        for event in stream_events(response.iter_lines(decode_unicode=True)):
            if event == "[DONE]":
                done = True
                break
            choice = event["choices"][0]
            if choice.get("delta", {}).get("content"):
                chunks += 1
            finish = choice.get("finish_reason") or finish
    assert done, "the stream ended without [DONE]"
    assert finish == "length"
    assert chunks >= 290, f"only {chunks} content chunks of 300 tokens arrived"


def test_token_count_answers_through_the_interceptor(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    count = requests.post(
        url(cluster, "/extras/tokenize/count"), headers=headers(api_key()), json={"messages": messages}, timeout=120
    )
    assert count.status_code == 200, count.text
    chat = requests.post(
        url(cluster, "/v1/chat/completions"),
        headers=headers(api_key()),
        json={"model": MODEL, "messages": messages, "max_tokens": 1},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert count.json()["count"] == chat.json()["usage"]["prompt_tokens"]


def test_second_deploy_changes_nothing(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", deployed["vars"], timeout=3600)
    assert result.data is not None, f"the playbook printed no JSON result: {result.stderr[-2000:]}"
    assert result.rc == 0, result.failure()
    changed = [t["name"] for t in result.tasks() if t["result"].get("changed")]
    assert result.changed == 0, f"changed on the second run: {changed}"


def test_scales_to_zero_without_traffic(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    waited = wait_for_zero(cluster)
    print(f"\nscaled to zero {waited:.0f} s after the test started waiting (scaledown period {SCALEDOWN_PERIOD} s)")


def test_requests_without_a_key_never_wake_the_model(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    assert replicas(cluster) == (0, 0), "the model must be at zero replicas"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
    statuses = set()
    for _attempt in range(50):
        response = requests.post(url(cluster, "/v1/chat/completions"), headers=headers(), json=body, timeout=30)
        statuses.add(response.status_code)
        assert "choices" not in response.text
    assert all(400 <= status < 500 for status in statuses), statuses
    # The scaler would have asked KEDA for a pod within a second or two of a counted request.
    time.sleep(20)
    assert replicas(cluster) == (0, 0), "a request without a key woke the model"


def test_cold_start_holds_the_request_until_the_model_answers(
    cluster: dict[str, str], deployed: dict[str, Any]
) -> None:
    assert replicas(cluster) == (0, 0), "the model must be at zero replicas before the cold start"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0}
    sent = time.time()
    with requests.post(
        url(cluster, "/v1/chat/completions"), headers=headers(api_key()), json=body, stream=True, timeout=900
    ) as response:
        first_byte = time.time()
        payload = response.content
    assert response.status_code == 200, payload[:500]
    answer = json.loads(payload)
    assert answer["choices"][0]["message"]["content"], answer

    pod = kget(cluster, "-n", NAMESPACE, "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"][0]
    conditions = {c["type"]: ts(c["lastTransitionTime"]) for c in pod["status"]["conditions"]}
    started = {
        c["name"]: ts(c["state"]["running"]["startedAt"])
        for c in pod["status"]["containerStatuses"]
        if "running" in c["state"]
    }
    created = ts(pod["metadata"]["creationTimestamp"])
    containers_up = max(started.values())
    parts = {
        "scale 0->1 (request sent -> pod created)": created - sent,
        "schedule (pod created -> scheduled)": conditions["PodScheduled"] - created,
        "container start (scheduled -> both containers running)": containers_up - conditions["PodScheduled"],
        "model load + readiness (running -> Ready)": conditions["Ready"] - containers_up,
        "forward (Ready -> first byte)": first_byte - conditions["Ready"],
    }
    print(f"\ncold start, request sent -> first byte: {first_byte - sent:.1f} s (timestamps have 1 s resolution)")
    for name, seconds in parts.items():
        print(f"  {name}: {seconds:.1f} s")
    assert replicas(cluster)[0] == 1


def test_model_ready_wakes_the_model_through_the_interceptor(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    wait_for_zero(cluster)
    args = {
        "base_url": cluster["LLMPODS_CLUSTER_INGRESS"],
        "host_header": HOST,
        "model": MODEL,
        "api_key": api_key(),
        "readiness_path": "",
        "completion": True,
        "wait_timeout": 600,
        "request_timeout": 600,
    }
    proc = subprocess.run(
        [
            str(VENV_BIN / "ansible"),
            "localhost",
            "-m",
            "llmpods.inference.model_ready",
            "-a",
            json.dumps(args),
            "-o",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env=ansible_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.partition("=>")[2])
    assert result["ready"] is True, result
    assert MODEL in result["models"], result
    assert result["completion"]["text"], result
    print(f"\nmodel_ready woke the model from zero in {result['elapsed']:.1f} s: {result['stages']}")
    assert replicas(cluster)[0] == 1


def test_a_changed_template_rolls_the_pods(cluster: dict[str, str], deployed: dict[str, Any], tmp_path: Path) -> None:
    before = {p["metadata"]["uid"] for p in kget(cluster, "-n", NAMESPACE, "pods")["items"]}
    chart = tmp_path / "llm-inference"
    shutil.copytree(ROOT / "files" / "helm" / "llm-inference", chart)
    template = chart / "templates" / "deployment.yaml"
    text = template.read_text()
    marker = "      annotations:\n"
    assert marker in text
    template.write_text(text.replace(marker, marker + "        llmpods.test/template-change: '1'\n", 1))
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", deploy_vars(cluster, chart), timeout=3600)
    assert result.rc == 0, result.failure()
    kubectl(cluster, "-n", NAMESPACE, "rollout", "status", f"deployment/{RELEASE}", "--timeout=600s")
    deployment = kget(cluster, "-n", NAMESPACE, f"deployment/{RELEASE}")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("llmpods.test/template-change") == "1"
    # The model may have gone back to zero since the deploy's check: a keyed request wakes it (or keeps it up).
    models = requests.get(url(cluster, "/v1/models"), headers=headers(api_key()), timeout=600)
    assert models.status_code == 200, models.text
    pods = kget(cluster, "-n", NAMESPACE, "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    # Pods of the old template may still be shutting down (their grace period); the live ones must be new.
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert live, "no pod after the rollout"
    assert all(p["metadata"]["annotations"].get("llmpods.test/template-change") == "1" for p in live)
    assert not {p["metadata"]["uid"] for p in live} & before, "the pods are the same as before the change"


def test_undeploy_leaves_no_object_of_the_release(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", deployed["vars"], timeout=1800)
    assert result.rc == 0, result.failure()
    assert helm(cluster, "status", RELEASE, "-n", NAMESPACE).returncode != 0
    deadline = time.monotonic() + 180
    left: list[str] = []
    kinds = ",".join(
        [
            "all",
            "configmaps",
            "secrets",
            "ingresses",
            "scaledobjects.keda.sh",
            "httpscaledobjects.http.keda.sh",
            "interceptorroutes.http.keda.sh",
        ]
    )
    while time.monotonic() < deadline:
        items = kget(cluster, "-n", NAMESPACE, kinds)["items"]
        left = [
            f"{i['kind']}/{i['metadata']['name']}"
            for i in items
            if i["kind"] != "Service" or i["metadata"]["name"] != "kubernetes"
            if not (i["kind"] == "ConfigMap" and i["metadata"]["name"] == "kube-root-ca.crt")
            if not (i["kind"] == "Secret" and i["type"] == "kubernetes.io/service-account-token")
        ]
        if not left:
            break
        time.sleep(3)
    assert not left, f"objects left in {NAMESPACE} after undeploy: {left}"
