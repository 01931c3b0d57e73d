"""The autoscaler API of a release on a real cluster (`make cluster`): kept, moved on request, and followed by the HPA.

A release installed on HTTPScaledObject stays on it when the deploy runs again with `auto`, although the cluster's
add-on serves InterceptorRoute too. The move to InterceptorRoute is asked for explicitly and keeps the ScaledObject
the add-on's operator made (watched all along: it never goes away); afterwards the model still scales to zero and
back through the edge. On both APIs, the HPA KEDA makes follows a change of the scaling target. The tests run in file
order and share one release in their own namespace, which the last fixture step removes.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import test_kubernetes_target as kubernetes_target
import yaml
from conftest import ROOT, STATE, VENV_BIN, need, run_playbook

NAMESPACE = "llmpods-autoscaling-test"
MODEL = "smollm2"
RELEASE = f"llm-{MODEL}"
HOST = "autoscaling.llmpods.test"
STATE_DIR = STATE / "autoscaling-test"
# Short, so that the model goes back to zero within the test; the steps in between finish well within it.
SCALEDOWN_PERIOD = 30
ZERO_WITHIN = SCALEDOWN_PERIOD + 180

cluster = kubernetes_target.cluster
kget, kubectl, helm = kubernetes_target.kget, kubernetes_target.kubectl, kubernetes_target.helm


def deploy_vars(cluster: dict[str, str], api: str) -> dict[str, Any]:
    return kubernetes_target.release_vars(
        cluster, NAMESPACE, HOST, STATE_DIR, {"scaledown_period": SCALEDOWN_PERIOD}, llmpods_autoscaling_api=api
    )


def deploy(cluster: dict[str, str], api: str) -> Any:
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", deploy_vars(cluster, api), timeout=3600)
    assert result.data is not None, f"the playbook printed no JSON result: {result.stderr[-2000:]}"
    assert result.rc == 0, result.failure()
    return result


def api_key() -> str:
    return (STATE_DIR / "keys" / f"{MODEL}.keys").read_text().splitlines()[0].strip()


def release_api(cluster: dict[str, str]) -> str:
    proc = helm(cluster, "get", "values", RELEASE, "-n", NAMESPACE, "--all", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["autoscaling"]["api"]


def names(cluster: dict[str, str], kind: str) -> list[str]:
    return sorted(i["metadata"]["name"] for i in kget(cluster, "-n", NAMESPACE, kind)["items"])


def scaled_object(cluster: dict[str, str]) -> dict[str, Any]:
    return kget(cluster, "-n", NAMESPACE, f"scaledobjects.keda.sh/{RELEASE}")


def hpa_of(cluster: dict[str, str], target: int, within: float = 120) -> dict[str, Any]:
    """The HPA of the release's ScaledObject once it scales on the add-on's metric at `target`, else the last seen."""
    deadline = time.monotonic() + within
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        name = scaled_object(cluster).get("status", {}).get("hpaName", f"keda-hpa-{RELEASE}")
        proc = kubectl(cluster, "-n", NAMESPACE, "get", "hpa", name, "-o", "json", check=False)
        if proc.returncode == 0:
            seen = json.loads(proc.stdout)
            if [m["type"] for m in seen["spec"].get("metrics", [])] == ["External"] and [
                m["external"]["target"].get("averageValue") for m in seen["spec"]["metrics"]
            ] == [str(target)]:
                return seen
        time.sleep(2)
    return seen


def assert_hpa_on_the_add_ons_metric(cluster: dict[str, str], target: int) -> None:
    hpa = hpa_of(cluster, target)
    metrics = hpa.get("spec", {}).get("metrics", [])
    assert [m["type"] for m in metrics] == ["External"], f"the HPA does not scale on the add-on's metric: {metrics}"
    assert metrics[0]["external"]["target"] == {"type": "AverageValue", "averageValue": str(target)}, metrics
    assert hpa["spec"]["maxReplicas"] == 1


def replicas(cluster: dict[str, str]) -> tuple[int, int]:
    return kubernetes_target.replicas(cluster, NAMESPACE)


def run_role(cluster: dict[str, str], tmp_path: Path, values: dict[str, Any]) -> Any:
    """The keda_chart role on its own (as a playbook of one's own would include it), with the release's values."""
    playbook = tmp_path / "release.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Deploy the model",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {"name": "Deploy", "ansible.builtin.include_role": {"name": "llmpods.inference.keda_chart"}}
                    ],
                }
            ]
        )
    )
    role_vars = {
        "keda_chart_values": values,
        "keda_chart_namespace": NAMESPACE,
        "keda_chart_release_name": RELEASE,
        "keda_chart_kubeconfig": cluster["KUBECONFIG"],
        "keda_chart_helm_binary": str(VENV_BIN / "helm"),
    }
    result = run_playbook(playbook, role_vars, timeout=1200)
    assert result.rc == 0, result.failure()
    return result


def user_values(cluster: dict[str, str]) -> dict[str, Any]:
    """The values the deploy gave the release (what the role was passed, plus what it added)."""
    proc = helm(cluster, "get", "values", RELEASE, "-n", NAMESPACE, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def with_target(values: dict[str, Any], target: int) -> dict[str, Any]:
    out = json.loads(json.dumps(values))
    out.setdefault("autoscaling", {}).setdefault("scalingMetric", {})["targetValue"] = target
    return out


@pytest.fixture(scope="module")
def installed(cluster: dict[str, str], demo_model: Path) -> Iterator[dict[str, Any]]:
    need(shutil.which("docker") is not None, "the docker client, to build and push the images")
    # What an earlier run may have left (its release, on whichever API) goes first: the test starts from nothing.
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=300s")
    deploy(cluster, "httpscaledobject")
    yield {}
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", deploy_vars(cluster, "auto"), timeout=1800)
    assert result.rc == 0, result.failure()
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=300s")


def test_installed_on_httpscaledobject_with_the_operators_scaled_object(
    cluster: dict[str, str], installed: dict[str, Any]
) -> None:
    assert release_api(cluster) == "httpscaledobject"
    assert names(cluster, "httpscaledobjects.http.keda.sh") == [RELEASE]
    assert names(cluster, "interceptorroutes.http.keda.sh") == []
    owners = scaled_object(cluster)["metadata"].get("ownerReferences", [])
    assert [(o["kind"], o["name"]) for o in owners] == [("HTTPScaledObject", RELEASE)]
    # Read after the install: the HPA KEDA made scales on the add-on's metric, at the chart's target of 1.
    assert_hpa_on_the_add_ons_metric(cluster, 1)


def test_auto_keeps_the_release_on_httpscaledobject(cluster: dict[str, str], installed: dict[str, Any]) -> None:
    uid = scaled_object(cluster)["metadata"]["uid"]
    result = deploy(cluster, "auto")
    changed = [t["name"] for t in result.tasks() if t["result"].get("changed")]
    assert result.changed == 0, f"auto changed the release: {changed}"
    assert release_api(cluster) == "httpscaledobject"
    assert names(cluster, "interceptorroutes.http.keda.sh") == [], "auto moved the release to InterceptorRoute"
    assert scaled_object(cluster)["metadata"]["uid"] == uid


def test_the_hpa_follows_a_new_target_on_httpscaledobject(
    cluster: dict[str, str], installed: dict[str, Any], tmp_path: Path
) -> None:
    # The add-on's operator does not change the ScaledObject for a new target, so KEDA would keep the old one.
    run_role(cluster, tmp_path, with_target(user_values(cluster), 2))
    assert release_api(cluster) == "httpscaledobject"
    assert_hpa_on_the_add_ons_metric(cluster, 2)


def namespace_kubeconfig(cluster: dict[str, str], tmp_path: Path) -> Path:
    """A kubeconfig for a ServiceAccount that may read and write in NAMESPACE only, as a tenant's deployer."""
    account = "deployer"
    manifest = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": account, "namespace": NAMESPACE},
            "rules": [
                {"apiGroups": ["", "apps", "autoscaling"], "resources": ["*"], "verbs": ["*"]},
                {"apiGroups": ["keda.sh", "http.keda.sh"], "resources": ["*"], "verbs": ["*"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": account, "namespace": NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}],
        },
    ]
    objects = tmp_path / "deployer.yaml"
    objects.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": manifest}))
    kubectl(cluster, "apply", "-f", str(objects))
    token = kubectl(cluster, "-n", NAMESPACE, "create", "token", account, "--duration=1h").stdout.strip()
    admin = json.loads(kubectl(cluster, "config", "view", "--raw", "--minify", "-o", "json").stdout)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "contexts": [{"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account}}],
        "current-context": account,
        "users": [{"name": account, "user": {"token": token}}],
    }
    path = tmp_path / "deployer.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def test_auto_needs_no_cluster_wide_read(cluster: dict[str, str], installed: dict[str, Any], tmp_path: Path) -> None:
    """A deployer with rights in the namespace only: auto reads the release and the served APIs, no CRD."""
    kubeconfig = namespace_kubeconfig(cluster, tmp_path)
    can_i = kubectl(
        cluster, "--kubeconfig", str(kubeconfig), "auth", "can-i", "get", "customresourcedefinitions", check=False
    )
    assert can_i.stdout.strip() == "no", "the deployer must not read CRDs for this test to mean anything"
    playbook = tmp_path / "values.yml"
    out = tmp_path / "api.json"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Complete the values",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Values",
                            "ansible.builtin.include_role": {
                                "name": "llmpods.inference.keda_chart",
                                "tasks_from": "values",
                            },
                        },
                        {
                            "name": "Write the API",
                            "ansible.builtin.copy": {
                                "content": "{{ keda_chart_release_values.autoscaling.api | to_json }}",
                                "dest": str(out),
                                "mode": "0600",
                            },
                        },
                    ],
                }
            ]
        )
    )
    for release, api in ((RELEASE, "httpscaledobject"), ("llm-not-installed", "interceptorroute")):
        values = user_values(cluster)
        values.pop("autoscaling", None)
        result = run_playbook(
            playbook,
            {
                "keda_chart_values": values,
                "keda_chart_namespace": NAMESPACE,
                "keda_chart_release_name": release,
                "keda_chart_kubeconfig": str(kubeconfig),
                "keda_chart_helm_binary": str(VENV_BIN / "helm"),
                "keda_chart_staging_dir": str(tmp_path / release),
            },
            timeout=600,
        )
        assert result.rc == 0, result.failure()
        assert json.loads(out.read_text()) == api, release


def test_the_move_to_interceptorroute_keeps_the_scaled_object(
    cluster: dict[str, str], installed: dict[str, Any]
) -> None:
    uid = scaled_object(cluster)["metadata"]["uid"]
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            proc = kubectl(
                cluster,
                "-n",
                NAMESPACE,
                "get",
                "scaledobjects.keda.sh",
                RELEASE,
                "--ignore-not-found",
                "-o",
                "jsonpath={.metadata.uid}",
                check=False,
            )
            if proc.returncode == 0:
                seen.append(proc.stdout.strip())
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # Asked explicitly: the deploy's llmpods_autoscaling_api is the role's keda_chart_autoscaling_api.
        deploy(cluster, "interceptorroute")
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert len(seen) > 10, "the ScaledObject was hardly watched"
    assert set(seen) == {uid}, f"the ScaledObject went away or was replaced during the move: {sorted(set(seen))}"

    assert release_api(cluster) == "interceptorroute"
    assert names(cluster, "interceptorroutes.http.keda.sh") == [RELEASE]
    assert names(cluster, "httpscaledobjects.http.keda.sh") == []
    so = scaled_object(cluster)
    assert so["metadata"].get("ownerReferences", []) == []
    assert so["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    trigger = so["spec"]["triggers"][0]["metadata"]
    assert trigger["interceptorRoute"] == RELEASE
    assert "httpScaledObject" not in trigger
    ready = {c["type"]: c["status"] for c in so["status"]["conditions"]}
    assert ready.get("Ready") == "True", so["status"]
    # The deploy's values have the chart's target of 1 again.
    assert_hpa_on_the_add_ons_metric(cluster, 1)


def test_a_second_deploy_after_the_move_changes_nothing(cluster: dict[str, str], installed: dict[str, Any]) -> None:
    for api in ("interceptorroute", "auto"):
        result = deploy(cluster, api)
        changed = [t["name"] for t in result.tasks() if t["result"].get("changed")]
        assert result.changed == 0, f"changed on a deploy with {api} after the move: {changed}"
    assert release_api(cluster) == "interceptorroute"


def test_the_hpa_follows_a_new_target_on_interceptorroute(
    cluster: dict[str, str], installed: dict[str, Any], tmp_path: Path
) -> None:
    run_role(cluster, tmp_path, with_target(user_values(cluster), 2))
    assert_hpa_on_the_add_ons_metric(cluster, 2)
    run_role(cluster, tmp_path, with_target(user_values(cluster), 1))
    assert_hpa_on_the_add_ons_metric(cluster, 1)


def test_after_the_move_the_model_scales_from_zero_through_the_edge(
    cluster: dict[str, str], installed: dict[str, Any]
) -> None:
    deadline = time.monotonic() + ZERO_WITHIN
    while replicas(cluster) != (0, 0):
        assert time.monotonic() < deadline, f"not at zero {ZERO_WITHIN} s after the last request: {replicas(cluster)}"
        time.sleep(3)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0}
    response = requests.post(
        f"{cluster['LLMPODS_CLUSTER_INGRESS']}/{MODEL}/v1/chat/completions",
        headers={"Host": HOST, "Content-Type": "application/json", "Authorization": f"Bearer {api_key()}"},
        json=body,
        timeout=900,
    )
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["message"]["content"]
    assert replicas(cluster)[0] == 1
