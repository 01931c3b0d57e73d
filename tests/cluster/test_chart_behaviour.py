"""What the chart's pod does on a real cluster (`make cluster`): the timeouts of the path let a long answer through,
and a hung inference server is restarted by the kubelet.

One release of the demo model, kept warm (one replica), in its own namespace behind its own host; every request
takes the user's path: the edge (Traefik) -> the Ingress -> the KEDA interceptor -> the Service -> the gateway -> the
inference server. The tests run in file order and share the release, which the fixture removes at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import test_kubernetes_target as kubernetes_target
from conftest import ROOT, STATE, need, run_playbook

NAMESPACE = "llmpods-chart-test"
MODEL = "smollm2"
RELEASE = f"llm-{MODEL}"
HOST = "chart.llmpods.test"
STATE_DIR = STATE / "chart-test"
LONG_ANSWER = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
    "max_tokens": 300,
    "temperature": 0,
}

cluster = kubernetes_target.cluster
kget, kubectl = kubernetes_target.kget, kubernetes_target.kubectl


def deploy_vars(cluster: dict[str, str]) -> dict[str, Any]:
    # Warm: the pod under test stays while it is stopped and restarted.
    return kubernetes_target.release_vars(cluster, NAMESPACE, HOST, STATE_DIR, {"replicas": {"min": 1, "max": 1}})


@pytest.fixture(scope="module")
def deployed(cluster: dict[str, str], demo_model: Path) -> Iterator[dict[str, Any]]:
    need(shutil.which("docker") is not None, "the docker client, to build and push the images")
    extra = deploy_vars(cluster)
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", extra, timeout=3600)
    assert result.rc == 0, result.failure()
    yield extra
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", extra, timeout=1800)
    assert result.rc == 0, result.failure()
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=300s")


def api_key() -> str:
    return next(
        line.strip()
        for line in (STATE_DIR / "keys" / f"{MODEL}.keys").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )


def post(cluster: dict[str, str], body: dict[str, Any], timeout: float = 900) -> requests.Response:
    return requests.post(
        f"{cluster['LLMPODS_CLUSTER_INGRESS']}/{MODEL}/v1/chat/completions",
        headers={"Host": HOST, "Content-Type": "application/json", "Authorization": f"Bearer {api_key()}"},
        json=body,
        timeout=timeout,
    )


def the_pod(cluster: dict[str, str]) -> dict[str, Any]:
    pods = kget(cluster, "-n", NAMESPACE, "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, f"expected one pod of {RELEASE}, found {[p['metadata']['name'] for p in live]}"
    return live[0]


def statuses(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["status"].get("containerStatuses", [])}


def seconds(duration: str) -> float:
    """A Go duration (500ms, 1m30s, 330s) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(h|ms|us|µs|ns|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Go duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def interceptor_response_header_default(cluster: dict[str, str]) -> float | None:
    """The interceptor's global response-header timeout, where its Deployment sets one."""
    deployment = kget(cluster, "-n", "keda", "deployment/keda-add-ons-http-interceptor")
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            if env["name"] in ("KEDA_RESPONSE_HEADER_TIMEOUT", "KEDA_HTTP_RESPONSE_HEADER_TIMEOUT") and env.get(
                "value"
            ):
                return seconds(env["value"])
    return None


def test_the_applied_objects_carry_the_derived_timeouts(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    """What the API server stored: the budgets (600 s, 300 s) and what derives from them."""
    routes = kget(cluster, "-n", NAMESPACE, "interceptorroutes.http.keda.sh")["items"]
    scaled = kget(cluster, "-n", NAMESPACE, "httpscaledobjects.http.keda.sh")["items"]
    assert len(routes) + len(scaled) == 1, "one add-on object routes the model"
    if routes:
        assert routes[0]["spec"]["timeouts"] == {"readiness": "600s", "responseHeader": "330s", "request": "0s"}
    else:
        assert scaled[0]["spec"]["timeouts"] == {"conditionWait": "600s", "responseHeader": "330s"}
    deployment = kget(cluster, "-n", NAMESPACE, f"deployment/{RELEASE}")
    assert deployment["spec"]["progressDeadlineSeconds"] == 960
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 330
    gateway_conf = kget(cluster, "-n", NAMESPACE, f"configmap/{RELEASE}-gateway")["data"]["nginx.conf"]
    assert "proxy_read_timeout 300s;" in gateway_conf


def test_a_long_answer_without_streaming_arrives_whole(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    """A non-streamed answer sends its headers only at its end: every hop must wait for a whole generation. The
    interceptor's own default would give up after a fraction of it; the route's derived timeout lets it through.
    The inference container's liveness probe goes on meanwhile and must not take the busy server for a hung one."""
    restarts = statuses(the_pod(cluster))["inference"]["restartCount"]
    default = interceptor_response_header_default(cluster)
    assert default is not None, "the test cluster's interceptor sets no global response-header timeout (up.sh)"
    started = time.monotonic()
    response = post(cluster, LONG_ANSWER)
    took = time.monotonic() - started
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 300
    assert len(answer["choices"][0]["message"]["content"]) > 300
    print(
        f"\n300 tokens without streaming through the edge: {took:.1f} s"
        f" (the interceptor's global response-header timeout: {default:g} s)"
    )
    # The test cluster sets a short global timeout: the route's own (330 s) is what let the answer through.
    assert took > default, "the answer came faster than the interceptor's global timeout: this proves nothing"
    assert statuses(the_pod(cluster))["inference"]["restartCount"] == restarts, "a busy server was restarted"


def inference_pid(pod: dict[str, Any]) -> int:
    """The node's PID of the inference server (the container's PID 1), found by its container ID in /proc."""
    container_id = statuses(pod)["inference"]["containerID"].split("://", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if container_id not in (entry / "cgroup").read_text():
                continue
            nspid = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if nspid.split()[-1] == "1":
            return int(entry.name)
    pytest.fail(f"no process of container {container_id} on this node (is the test running on the cluster's node?)")


def test_a_stopped_inference_server_is_restarted(cluster: dict[str, str], deployed: dict[str, Any]) -> None:
    """SIGSTOP the inference server (a hang: the kernel still accepts its connections, nothing answers). Its
    liveness probe fails, the kubelet restarts the inference container alone, and the model answers again.

    From the node: inside the container the server is PID 1, which ignores SIGSTOP from its own namespace."""
    need(os.geteuid() == 0, "root, to stop a process of the cluster's node")
    pod = the_pod(cluster)
    before = statuses(pod)
    pid = inference_pid(pod)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        deadline = stopped + 300
        now = before
        while time.monotonic() < deadline:
            now = statuses(the_pod(cluster))
            if now["inference"]["restartCount"] > before["inference"]["restartCount"]:
                break
            time.sleep(3)
        else:
            pytest.fail(f"the stopped inference server was not restarted within 300 s: {now['inference']}")
    finally:
        # The restart killed it already; were the test to fail, the server goes on instead of staying stopped.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    restarted = time.monotonic() - stopped
    assert the_pod(cluster)["metadata"]["uid"] == pod["metadata"]["uid"], "the container restarts, the pod stays"
    assert now["gateway"]["restartCount"] == before["gateway"]["restartCount"], "the gateway was restarted"
    terminated = now["inference"]["lastState"]["terminated"]
    events = kget(
        cluster, "-n", NAMESPACE, "events", "--field-selector", f"involvedObject.uid={pod['metadata']['uid']}"
    )
    probe_failures = [
        e["message"]
        for e in events["items"]
        if e["reason"] == "Unhealthy" and "spec.containers{inference}" in e["involvedObject"].get("fieldPath", "")
    ]
    assert any(m.startswith("Liveness probe failed") for m in probe_failures), probe_failures
    print(
        f"\nrestarted {restarted:.0f} s after SIGSTOP ({terminated.get('reason')}, exit {terminated.get('exitCode')})"
    )
    print(f"last probe failure: {probe_failures[-1]}")
    # 6 failed checks 10 s apart, then 10 s of grace: well within the pod's 330 s grace.
    assert restarted < 200, "the kubelet waited for the pod's grace to kill a stopped process"

    # The interceptor holds the request until the reloaded model is ready again.
    response = post(cluster, {**LONG_ANSWER, "max_tokens": 8}, timeout=600)
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["message"]["content"]
    print(f"answered again {time.monotonic() - stopped:.0f} s after SIGSTOP")
