"""Unit tests for the pod_plan filter: a hand-written release in, Docker parameters and a probe plan out."""

from __future__ import annotations

import base64
import copy
import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[4] / "plugins" / "filter" / "pod_spec.py"
_spec = importlib.util.spec_from_file_location("llmpods_pod_spec", PLUGIN)
pod_spec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pod_spec)

KEY = "sk-test-0123456789abcdef"
STATE = "/srv/state/pods/smollm2"

LABELS = {"app.kubernetes.io/name": "llm-inference", "app.kubernetes.io/instance": "smollm2"}


def release() -> list[dict]:
    """What `helm template` renders for one model, trimmed to what the pod uses."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "smollm2-llm-inference", "namespace": "llm"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": LABELS},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {"checksum/config": "abc"}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "fsGroup": 10002},
                    "terminationGracePeriodSeconds": 20,
                    "containers": [
                        {
                            "name": "gateway",
                            "image": "llmpods/gateway:0.1.0",
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["nginx"],
                            "args": ["-c", "/etc/llmpods/gateway/nginx.conf", "-g", "daemon off;"],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "securityContext": {
                                "runAsUser": 10002,
                                "runAsGroup": 10002,
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "gateway-config", "mountPath": "/etc/llmpods/gateway", "readOnly": True},
                                {"name": "api-keys", "mountPath": "/etc/llmpods/keys", "readOnly": True},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                            "startupProbe": {
                                "httpGet": {"path": "/alive", "port": "http"},
                                "periodSeconds": 2,
                                "failureThreshold": 150,
                            },
                            "readinessProbe": {"httpGet": {"path": "/alive", "port": "http"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                        },
                        {
                            "name": "inference",
                            "image": "llmpods/inference-cpu:0.3.36",
                            "env": [
                                {"name": "MODEL_ALIAS", "value": "smollm2"},
                                {"name": "MODEL", "value": "/models/SmolLM2-135M-Instruct.Q4_1.gguf"},
                                {"name": "HOST", "value": "127.0.0.1"},
                                {
                                    "name": "N_CTX",
                                    "valueFrom": {"configMapKeyRef": {"name": "smollm2-env", "key": "n_ctx"}},
                                },
                                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "GREETING", "value": "$(MODEL_ALIAS) on $(POD), $$(kept)"},
                            ],
                            "securityContext": {
                                "runAsUser": 10001,
                                "runAsGroup": 10001,
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "resources": {"limits": {"cpu": "1500m", "memory": "2Gi"}, "requests": {"memory": "1Gi"}},
                            "volumeMounts": [{"name": "model", "mountPath": "/models", "readOnly": True}],
                        },
                    ],
                    "volumes": [
                        {"name": "model", "hostPath": {"path": "/srv/models", "type": "Directory"}},
                        {"name": "gateway-config", "configMap": {"name": "smollm2-gateway"}},
                        {"name": "api-keys", "secret": {"secretName": "smollm2-keys", "defaultMode": 0o400}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "smollm2-gateway"},
            "data": {"nginx.conf": "events {}\n", "gateway.js": "export default {};\n"},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smollm2-env"}, "data": {"n_ctx": "2048"}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "smollm2-keys"},
            "type": "Opaque",
            "data": {"api-keys": base64.b64encode(f"{KEY}\n".encode()).decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "smollm2-llm-inference"},
            "spec": {"selector": LABELS, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
        deployment,
        None,
    ]


def plan(docs=None, **kwargs):
    kwargs.setdefault("state_dir", STATE)
    kwargs.setdefault("host_port", 8080)
    return pod_spec.pod_plan(release() if docs is None else docs, **kwargs)


def pod_template(docs):
    return next(d for d in docs if d and d["kind"] == "Deployment")["spec"]["template"]["spec"]


def by_name(result, name):
    return next(c for c in result["containers"] if c["name"] == name)


# ------------------------------------------------------------------------------------------------- structure


def test_infra_container_owns_the_network_and_publishes_the_service_target_port():
    result = plan(pod_name="llmpods-smollm2")
    infra = result["infra"]
    assert infra["name"] == "llmpods-smollm2-infra"
    assert infra["image"] == "llmpods/gateway:0.1.0"
    assert infra["entrypoint"] == ["sleep", "infinity"]
    assert infra["published_ports"] == ["127.0.0.1:8080:8080"]
    assert infra["hostname"] == "llmpods-smollm2"
    assert infra["read_only"] and infra["cap_drop"] == ["ALL"]
    assert result["published"] == {"address": "127.0.0.1", "port": 8080, "container_port": 8080}
    for entry in result["containers"]:
        assert entry["params"]["network_mode"] == "container:llmpods-smollm2-infra"
        assert entry["params"]["ipc_mode"] == "container:llmpods-smollm2-infra"


def test_pod_name_defaults_to_the_workload_name():
    result = plan()
    assert result["pod"] == "smollm2-llm-inference"
    assert result["workload"] == "Deployment/smollm2-llm-inference"
    assert [c["docker_name"] for c in result["containers"]] == [
        "smollm2-llm-inference-gateway",
        "smollm2-llm-inference-inference",
    ]


def test_command_and_args_map_to_entrypoint_and_command():
    gateway = by_name(plan(), "gateway")["params"]
    assert gateway["entrypoint"] == ["nginx"]
    assert gateway["command"] == ["-c", "/etc/llmpods/gateway/nginx.conf", "-g", "daemon off;"]
    inference = by_name(plan(), "inference")["params"]
    assert "entrypoint" not in inference and "command" not in inference


def test_security_context_user_read_only_caps_and_no_new_privileges():
    gateway = by_name(plan(), "gateway")["params"]
    assert gateway["user"] == "10002:10002"
    assert gateway["groups"] == ["10002"]
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    assert gateway["security_opts"] == ["no-new-privileges"]
    assert by_name(plan(), "inference")["params"]["user"] == "10001:10001"


def test_pod_level_run_as_user_applies_unless_the_container_overrides_it():
    docs = release()
    spec = pod_template(docs)
    spec["securityContext"]["runAsUser"] = 4242
    del spec["containers"][1]["securityContext"]["runAsUser"]
    del spec["containers"][1]["securityContext"]["runAsGroup"]
    result = plan(docs)
    assert by_name(result, "inference")["params"]["user"] == "4242"
    assert by_name(result, "gateway")["params"]["user"] == "10002:10002"


def test_env_resolves_configmap_field_refs_and_expands_references():
    entry = by_name(plan(pod_name="llmpods-smollm2"), "inference")
    env = entry["params"]["env"]
    assert env["N_CTX"] == "2048"
    assert env["POD"] == "llmpods-smollm2"
    assert env["GREETING"] == "smollm2 on llmpods-smollm2, $(kept)"
    assert entry["sensitive"] is False
    assert list(env) == sorted(env)


def test_secret_env_marks_the_container_sensitive():
    docs = release()
    pod_template(docs)["containers"][1]["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "smollm2-keys", "key": "api-keys"}}}
    )
    entry = by_name(plan(docs), "inference")
    assert entry["sensitive"] is True
    assert entry["params"]["env"]["TOKEN"] == f"{KEY}\n"


def test_env_from_with_prefix():
    docs = release()
    pod_template(docs)["containers"][1]["envFrom"] = [{"configMapRef": {"name": "smollm2-env"}, "prefix": "X_"}]
    assert by_name(plan(docs), "inference")["params"]["env"]["X_n_ctx"] == "2048"


def test_resources_map_to_docker_limits():
    params = by_name(plan(), "inference")["params"]
    assert params["cpus"] == 1.5
    assert params["memory"] == str(2 * 1024**3)
    assert params["memory_reservation"] == str(1024**3)


def test_nvidia_gpu_becomes_a_device_request():
    docs = release()
    pod_template(docs)["containers"][1]["resources"]["limits"]["nvidia.com/gpu"] = 1
    params = by_name(plan(docs), "inference")["params"]
    assert params["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]


def test_unknown_extended_resource_is_noted_not_fatal():
    docs = release()
    pod_template(docs)["containers"][1]["resources"]["limits"]["example.com/fpga"] = 1
    assert any("example.com/fpga" in note for note in plan(docs)["notes"])


# ------------------------------------------------------------------------------------------------- volumes


def test_mounts_hostpath_configmap_secret_and_tmpfs():
    result = plan()
    gateway = by_name(result, "gateway")["params"]["mounts"]
    assert gateway == [
        {
            "target": "/etc/llmpods/gateway",
            "type": "bind",
            "source": f"{STATE}/volumes/gateway-config",
            "read_only": True,
        },
        {"target": "/etc/llmpods/keys", "type": "bind", "source": f"{STATE}/volumes/api-keys", "read_only": True},
        {"target": "/tmp", "type": "tmpfs", "tmpfs_mode": "1777", "tmpfs_size": str(64 * 1024**2)},
    ]
    inference = by_name(result, "inference")["params"]["mounts"]
    assert inference == [{"target": "/models", "type": "bind", "source": "/srv/models", "read_only": True}]
    assert result["host_paths"] == [{"volume": "model", "path": "/srv/models", "type": "Directory"}]


def test_volume_files_carry_content_mode_and_owner():
    files = {f["path"]: f for f in plan()["files"]}
    keys = files[f"{STATE}/volumes/api-keys/api-keys"]
    assert keys["content"] == f"{KEY}\n"
    assert keys["secret"] is True
    # defaultMode 0400 with fsGroup: root-owned, group fsGroup, group-readable.
    assert (keys["mode"], keys["owner"], keys["group"]) == ("0440", 0, 10002)
    assert keys["mode_unprivileged"] == "0444"
    conf = files[f"{STATE}/volumes/gateway-config/nginx.conf"]
    assert conf["content"] == "events {}\n"
    assert conf["secret"] is False
    assert conf["mode"] == "0644"


def test_without_fs_group_files_belong_to_the_only_user_that_mounts_them():
    docs = release()
    del pod_template(docs)["securityContext"]["fsGroup"]
    files = {f["path"]: f for f in plan(docs)["files"]}
    keys = files[f"{STATE}/volumes/api-keys/api-keys"]
    assert (keys["mode"], keys["owner"], keys["group"]) == ("0400", 10002, 10002)


def test_state_dir_is_private_and_volume_dirs_listed():
    dirs = {d["path"]: d["mode"] for d in plan()["dirs"]}
    assert dirs[STATE] == "0700"
    assert dirs[f"{STATE}/volumes/api-keys"] == "0755"


def test_items_and_sub_path():
    docs = release()
    spec = pod_template(docs)
    spec["volumes"][1]["configMap"]["items"] = [{"key": "nginx.conf", "path": "conf/main.conf", "mode": 0o600}]
    spec["containers"][0]["volumeMounts"][0] = {
        "name": "gateway-config",
        "mountPath": "/etc/nginx/nginx.conf",
        "subPath": "conf/main.conf",
    }
    result = plan(docs)
    paths = [f["path"] for f in result["files"] if "gateway-config" in f["path"]]
    assert paths == [f"{STATE}/volumes/gateway-config/conf/main.conf"]
    assert {"path": f"{STATE}/volumes/gateway-config/conf", "mode": "0755"} in result["dirs"]
    mount = by_name(result, "gateway")["params"]["mounts"][0]
    assert mount["source"] == f"{STATE}/volumes/gateway-config/conf/main.conf"
    assert mount["read_only"] is True


def test_shared_empty_dir_is_a_world_writable_host_dir_and_init_containers_run_first():
    docs = release()
    spec = pod_template(docs)
    spec["volumes"][0] = {"name": "model", "emptyDir": {}}
    spec["initContainers"] = [
        {
            "name": "download",
            "image": "llmpods/inference-cpu:0.3.36",
            "command": ["python3", "-c", "print('fetch')"],
            "volumeMounts": [{"name": "model", "mountPath": "/models"}],
        }
    ]
    result = plan(docs)
    assert {"path": f"{STATE}/volumes/model", "mode": "0777"} in result["dirs"]
    [init] = result["init_containers"]
    assert init["docker_name"] == "smollm2-llm-inference-init-download"
    assert "restart_policy" not in init["params"]
    assert init["params"]["mounts"] == [{"target": "/models", "type": "bind", "source": f"{STATE}/volumes/model"}]
    assert result["host_paths"] == []


def test_pvc_is_refused_with_a_clear_message():
    docs = release()
    pod_template(docs)["volumes"][0] = {"name": "model", "persistentVolumeClaim": {"claimName": "models"}}
    with pytest.raises(pod_spec.PodSpecError, match="persistentVolumeClaim models is not supported locally"):
        plan(docs)


def test_missing_configmap_is_an_error_unless_optional():
    docs = [d for d in release() if not (d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "smollm2-gateway")]
    with pytest.raises(pod_spec.PodSpecError, match="ConfigMap smollm2-gateway is not among"):
        plan(docs)
    pod_template(docs)["volumes"][1]["configMap"]["optional"] = True
    assert not [f for f in plan(docs)["files"] if "gateway-config" in f["path"]]


# ------------------------------------------------------------------------------------------------- probes


def test_probes_follow_the_kubelet_defaults_and_use_the_published_port():
    probes = {p["kind"]: p for p in plan()["probes"]}
    startup = probes["startup"]
    assert startup["action"] == "http"
    assert (startup["host"], startup["host_port"], startup["path"]) == ("127.0.0.1", 8080, "/alive")
    assert (startup["period"], startup["failure_threshold"], startup["timeout"]) == (2, 150, 1)
    readiness = probes["readiness"]
    assert (readiness["period"], readiness["failure_threshold"], readiness["initial_delay"]) == (5, 3, 0)
    assert probes["liveness"]["path"] == "/healthz"
    assert all(p["docker_name"] == "smollm2-llm-inference-gateway" for p in probes.values())


def test_probe_on_an_unpublished_port_goes_to_the_pod_ip():
    docs = release()
    pod_template(docs)["containers"][1]["readinessProbe"] = {"tcpSocket": {"port": 8000}, "timeoutSeconds": 2}
    probe = next(p for p in plan(docs)["probes"] if p["container"] == "inference")
    assert probe == {
        "container": "inference",
        "docker_name": "smollm2-llm-inference-inference",
        "kind": "readiness",
        "action": "tcp",
        "port": 8000,
        "host": None,
        "host_port": 8000,
        "initial_delay": 0,
        "period": 10,
        "timeout": 2,
        "failure_threshold": 3,
        "success_threshold": 1,
    }


def test_published_port_bound_to_all_addresses_is_probed_on_loopback():
    probes = plan(bind_address="0.0.0.0", host_port=18080)["probes"]
    assert {(p["host"], p["host_port"]) for p in probes} == {("127.0.0.1", 18080)}
    assert plan(bind_address="0.0.0.0", host_port=18080)["infra"]["published_ports"] == ["0.0.0.0:18080:8080"]


def test_exec_probe():
    docs = release()
    pod_template(docs)["containers"][1]["startupProbe"] = {"exec": {"command": ["test", "-f", "/models/x"]}}
    probe = next(p for p in plan(docs)["probes"] if p["container"] == "inference")
    assert probe["action"] == "exec" and probe["command"] == ["test", "-f", "/models/x"]


# ------------------------------------------------------------------------------------------------- identity


def test_plan_is_deterministic():
    assert plan() == plan()
    shuffled = release()
    shuffled.reverse()
    assert plan(shuffled) == plan()


def test_config_change_makes_a_new_pod_but_a_key_rotation_does_not():
    base = plan()
    docs = release()
    docs[0]["data"]["nginx.conf"] = "events { worker_connections 64; }\n"
    changed = plan(docs)
    assert changed["hash"] != base["hash"]
    assert changed["infra"]["labels"]["io.llmpods.pod-hash"] == changed["hash"]
    docs = release()
    docs[2]["data"]["api-keys"] = base64.b64encode(b"sk-other\n").decode()
    rotated = plan(docs)
    # Mounted Secrets are updated in place, as the kubelet does: same pod, new file content.
    assert rotated["hash"] == base["hash"]
    assert rotated["files"] != base["files"]


def test_labels_name_the_pod_and_hash_the_spec():
    result = plan(pod_name="llmpods-smollm2")
    labels = by_name(result, "gateway")["params"]["labels"]
    assert labels["io.llmpods.pod"] == "llmpods-smollm2"
    assert labels["io.llmpods.container"] == "gateway"
    assert labels["io.llmpods.pod-hash"] == result["hash"]
    assert len(labels["io.llmpods.spec-hash"]) == 16
    assert labels["app.kubernetes.io/instance"] == "smollm2"
    # No secret material in labels.
    assert KEY not in repr(labels)


def test_input_is_not_modified():
    docs = release()
    before = copy.deepcopy(docs)
    plan(docs)
    assert docs == before


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop(), "exactly one workload"),
        (lambda d: pod_template(d)["containers"][1].update(image="x", name="gateway"), "container names repeat"),
        (lambda d: pod_template(d)["volumes"].append({"name": "nfs", "nfs": {"server": "x", "path": "/"}}), None),
        (
            lambda d: pod_template(d)["containers"][1]["env"].append(
                {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}
            ),
            "fieldRef status.phase is not supported locally",
        ),
        (
            lambda d: pod_template(d)["containers"][0]["startupProbe"]["httpGet"].update(port="nope"),
            "port 'nope' is neither",
        ),
    ],
)
def test_errors_name_what_is_wrong(mutate, message):
    docs = release()
    docs.pop()  # the trailing None document
    mutate(docs)
    if message is None:
        # An unused volume of an unsupported type is ignored; a used one is refused.
        plan(docs)
        pod_template(docs)["containers"][1]["volumeMounts"].append({"name": "nfs", "mountPath": "/nfs"})
        message = "volume nfs: nfs volumes are not supported locally"
    with pytest.raises(pod_spec.PodSpecError, match=message):
        plan(docs)


def test_bad_pod_name_and_raw_text_are_refused():
    with pytest.raises(pod_spec.PodSpecError, match="not a DNS label"):
        plan(pod_name="Bad_Name")
    with pytest.raises(pod_spec.PodSpecError, match="from_yaml_all"):
        pod_spec.pod_plan("kind: Deployment", state_dir=STATE)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("500m", 0.5), ("2", 2), ("1Gi", 1024**3), ("64Mi", 64 * 1024**2), ("1.5G", 1_500_000_000), (3, 3), ("1e3", 1000)],
)
def test_k8s_quantity(value, expected):
    assert pod_spec.k8s_quantity(value) == expected


def test_k8s_quantity_rejects_garbage():
    with pytest.raises(pod_spec.PodSpecError):
        pod_spec.k8s_quantity("lots")


def test_redact_hides_secret_file_content_and_secret_env_only():
    docs = release()
    pod_template(docs)["containers"][1]["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "smollm2-keys", "key": "api-keys"}}}
    )
    clear, redacted = plan(docs), plan(docs, redact=True)
    assert KEY not in repr(redacted)
    assert by_name(redacted, "inference")["secret_env"] == ["TOKEN"]
    assert by_name(redacted, "inference")["params"]["env"]["N_CTX"] == "2048"
    # Everything else, the hashes included, is the same.
    assert redacted["hash"] == clear["hash"]
    assert [c["params"]["labels"] for c in redacted["containers"]] == [
        c["params"]["labels"] for c in clear["containers"]
    ]
