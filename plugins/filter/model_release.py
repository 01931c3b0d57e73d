# Copyright: llmpods maintainers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""Turn one entry of the model catalog into what a deployment of the llm-inference chart needs.

The result is the release name, the chart values (shaped like ``files/helm/llm-inference/values.yaml``) and the
API-key Secret manifest the values reference. Both targets call it: the local target renders the chart with these
values and runs its pod on Docker, the kubernetes target installs the release with them, so the two pods get the
same values by construction. The filter docs live next to this file (``model_release.yml``).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ansible.errors import AnsibleFilterError

# The hardware target of the inference image and the GPU vendor whose device plugin resource it requests unless
# the entry says (gpu_vendor): vulkan runs on either.
GPU_VENDORS = {"cpu": "none", "vulkan": "none", "cuda": "nvidia", "rocm": "amd"}
VENDORS = ("none", "nvidia", "amd")
SOURCES = ("download", "hostPath", "persistentVolumeClaim")
BACKENDS = ("llama-cpp-python", "llama-server")
# The item of the Secret that holds the keys; the chart mounts it as the gateway's keys file.
KEYS_ITEM = "api-keys"
# A key: the syntax the gateway accepts (files/nginx/gateway.js, KEY_SYNTAX: RFC 6750 token characters, no "/" at
# either end, no "//", no path segment starting with "."), at least 16 characters so that no deployment has a weak key.
KEY_PATTERN = re.compile(
    r"^(?=[^ ]{16,200}$)[A-Za-z0-9_~+=-][A-Za-z0-9._~+=-]*(?:/[A-Za-z0-9_~+=-][A-Za-z0-9._~+=-]*)*$"
)
KEY_RULE = "16 to 200 of A-Z a-z 0-9 - . _ ~ + / = (no / at either end, no // and no /.)"


def _field(entry: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = entry.get(name)
    return default if value is None or value == "" else value


def _int(entry: Mapping[str, Any], name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AnsibleFilterError(
            f"model_release: model {entry.get('name')!r}: field {name} must be a whole number, got {value!r}"
        ) from None


def api_key_secret(
    name: str, namespace: str, keys: Sequence[str] | None, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The Secret the gateway reads its keys from: one key per line under ``api-keys``.

    ``keys=None`` gives the Secret without its data: enough to name it, e.g. to remove it.
    """
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    secret: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata}
    if keys is None:
        return secret
    if isinstance(keys, str):
        raise AnsibleFilterError(f"model_release: Secret {name}: keys must be a list of keys, not a string")
    keys = list(keys)
    if not keys:
        raise AnsibleFilterError(f"model_release: Secret {name}: there is no API key")
    bad = [i for i, key in enumerate(keys) if not isinstance(key, str) or not KEY_PATTERN.match(key)]
    if bad:
        # Never show the key itself, only where it is.
        raise AnsibleFilterError(
            f"model_release: Secret {name}: API key(s) at position {', '.join(map(str, bad))} must be {KEY_RULE}"
        )
    return {
        **secret,
        # data, not stringData: what the API server stores, so a second apply compares equal and changes nothing.
        "data": {KEYS_ITEM: base64.b64encode("".join(f"{key}\n" for key in keys).encode()).decode("ascii")},
    }


def _budget(name: str, value: Any) -> int:
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        seconds = 0
    if isinstance(value, bool) or seconds < 1:
        raise AnsibleFilterError(f"model_release: {name} must be a positive number of seconds, got {value!r}")
    return seconds


def model_release(
    entry: Mapping[str, Any],
    keys: Sequence[str] | None = None,
    namespace: str = "llmpods",
    registry: str = "",
    hosts: Sequence[str] = (),
    cold_start_seconds: int = 600,
    generation_seconds: int = 300,
) -> dict[str, Any]:
    """Release name, namespace, chart values and key Secret for one derived catalog entry.

    ``entry`` is an entry of ``_llmpods_catalog`` (playbooks/tasks/catalog.yml): the catalog fields plus the
    derived ``release``, ``model_file``, ``source`` and ``host_path``. Release settings that are not the model's
    (namespace, registry, ingress hosts, the two time budgets) are arguments; the keda_chart role sets the
    autoscaler API.
    """
    cold_start = _budget("cold_start_seconds", cold_start_seconds)
    generation = _budget("generation_seconds", generation_seconds)
    if not isinstance(entry, Mapping):
        raise AnsibleFilterError(f"model_release: expected a catalog entry (a mapping), got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise AnsibleFilterError(f"model_release: the catalog entry has no name: {dict(entry)!r}")
    target = entry.get("target", "cpu")
    if target not in GPU_VENDORS:
        raise AnsibleFilterError(
            f"model_release: model {name!r}: field target must be one of {', '.join(GPU_VENDORS)}, got {target!r}"
        )
    source = _field(entry, "source", "download")
    if source not in SOURCES:
        raise AnsibleFilterError(
            f"model_release: model {name!r}: field source must be one of {', '.join(SOURCES)}, got {source!r}"
        )
    vendor = _field(entry, "gpu_vendor", GPU_VENDORS[target])
    if vendor not in VENDORS:
        raise AnsibleFilterError(
            f"model_release: model {name!r}: field gpu_vendor must be one of {', '.join(VENDORS)}, got {vendor!r}"
        )
    backend = _field(entry, "backend", "llama-cpp-python")
    if backend not in BACKENDS:
        raise AnsibleFilterError(
            f"model_release: model {name!r}: field backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    groups = [_int(entry, "supplemental_groups", group) for group in entry.get("supplemental_groups") or []]
    model_file = _field(entry, "model_file") or _field(entry, "file", "")
    release = _field(entry, "release") or f"llm-{name}"
    secret_name = f"{release}-api-keys"
    replicas = entry.get("replicas") or {}
    gpu_layers = entry.get("gpu_layers")

    values: dict[str, Any] = {
        "model": {
            "name": name,
            "file": str(model_file).rsplit("/", 1)[-1],
            "chatFormat": _field(entry, "chat_format", ""),
            "contextSize": _int(entry, "context_size", _field(entry, "context_size", 2048)),
            "threads": _int(entry, "threads", _field(entry, "threads", 0)),
            "gpuLayers": None if gpu_layers is None or gpu_layers == "" else _int(entry, "gpu_layers", gpu_layers),
            "source": {
                "type": source,
                "hostPath": {"path": _field(entry, "host_path", "")},
                "persistentVolumeClaim": {"claimName": _field(entry, "pvc", "")},
                "download": {
                    "url": _field(entry, "url", ""),
                    "sha256": str(_field(entry, "sha256", "")),
                    "size": None if _field(entry, "size") is None else _int(entry, "size", entry["size"]),
                    "cache": {"claimName": _field(entry, "cache_pvc", "")},
                },
            },
        },
        "imageRegistry": registry or "",
        # The chart derives every timeout of the pod's path from these two, the gateway's too (the keda_chart role
        # renders nginx.conf with the generation budget).
        "timeouts": {"coldStartSeconds": cold_start, "generationSeconds": generation},
        "inference": {"target": target, "backend": backend},
        "gpu": {
            "vendor": vendor,
            "count": _int(entry, "gpu_count", _field(entry, "gpu_count", 1)),
            "supplementalGroups": groups,
        },
        "apiKeys": {"existingSecret": secret_name},
        "autoscaling": {
            "hosts": list(hosts or []),
            "minReplicas": _int(entry, "replicas.min", replicas.get("min", 0)),
            "maxReplicas": _int(entry, "replicas.max", replicas.get("max", 1)),
            "scaledownPeriod": _int(entry, "scaledown_period", _field(entry, "scaledown_period", 300)),
        },
        "nodeSelector": dict(entry.get("node_selector") or {}),
        "tolerations": list(entry.get("tolerations") or []),
    }
    if _field(entry, "parallel") is not None:
        values["inference"]["parallel"] = _int(entry, "parallel", entry["parallel"])
    if entry.get("resources"):
        values["inference"]["resources"] = dict(entry["resources"])

    labels = {
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/part-of": "llmpods",
        "app.kubernetes.io/managed-by": "ansible",
        "llmpods.io/model": name,
    }
    return {
        "name": release,
        "namespace": namespace,
        "values": values,
        "secret": api_key_secret(secret_name, namespace, keys, labels),
    }


class FilterModule:
    def filters(self):
        return {"model_release": model_release}
