"""Every kind of mistake in the model catalog stops deploy.yml before anything changes, naming the entry and field.

The playbook runs as a user runs it; the catalog check is its first task, so a bad catalog never reaches Docker or
a cluster (nothing here needs either).
"""

from __future__ import annotations

import pytest
from conftest import ROOT, STATE, free_port, need_collection, run_playbook

GOOD = {"name": "smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "target": "cpu", "context_size": 2048}
DOWNLOAD = {"url": "https://models.example.test/tiny.gguf", "sha256": "ab" * 32}
PACKAGE = {"requirement": "llm-tiny==1.0", "member": "llm_tiny/tiny.gguf"}

# (entry fields over a good entry named "badmodel", the field named in the error, what the error says)
ENTRY_ERRORS = {
    "name-missing": ({"name": None}, "name", "is required"),
    "name-not-dns-label": ({"name": "Tiny_Model"}, "name", "must be a DNS label"),
    "name-too-long": ({"name": "m" * 64}, "name", "must be a DNS label"),
    # The release llm-<name> must fit Helm's 53 characters; the Service it names must start with a letter.
    "name-too-long-for-a-release": ({"name": "m" * 50}, "name", "at most 49, so that the release llm-<name> fits"),
    "name-digit-first": ({"name": "7b-chat"}, "name", "must be a DNS label that starts with a letter"),
    "target-unknown": ({"target": "tpu"}, "target", "must be one of cpu, cuda, rocm, vulkan, got tpu"),
    "target-missing": ({"target": None}, "target", "is required"),
    "file-missing": ({"file": None}, "file", "is required"),
    "file-not-gguf": ({"file": "model.bin"}, "file", "must name a .gguf file"),
    "file-absent-no-url": ({"file": "no-such-model.gguf"}, "file", "does not exist, and the entry has no url"),
    "sha256-missing": ({"file": "tiny.gguf", "url": DOWNLOAD["url"]}, "sha256", "must be 64 hex digits"),
    "sha256-short": ({"file": "tiny.gguf", **DOWNLOAD, "sha256": "abc"}, "sha256", "must be 64 hex digits"),
    "package-no-sha256": ({"file": "tiny.gguf", "package": PACKAGE}, "sha256", "when url or package is set"),
    "package-and-url": (
        {"file": "tiny.gguf", **DOWNLOAD, "package": PACKAGE},
        "package",
        "url or from package, not both",
    ),
    "package-member-missing": (
        {"file": "tiny.gguf", "sha256": "ab" * 32, "package": {"requirement": "llm-tiny==1.0"}},
        "package.member",
        "is required",
    ),
    "package-member-outside": (
        {"file": "tiny.gguf", "sha256": "ab" * 32, "package": {**PACKAGE, "member": "../../etc/passwd"}},
        "package.member",
        "must be a path inside the wheel",
    ),
    "package-not-mapping": (
        {"file": "tiny.gguf", "sha256": "ab" * 32, "package": "llm-tiny"},
        "package",
        "must be {requirement: name==version, member: path in the wheel}",
    ),
    "replicas-not-mapping": ({"replicas": 3}, "replicas", "must be {min: N, max: M}"),
    "replicas-min-not-int": ({"replicas": {"min": "few", "max": 1}}, "replicas.min", "must be of type int"),
    "replicas-min-above-max": ({"replicas": {"min": 3, "max": 2}}, "replicas", "0 <= N <= M"),
    "replicas-max-zero": ({"replicas": {"min": 0, "max": 0}}, "replicas", "M >= 1"),
    "replicas-unknown-field": ({"replicas": {"minimum": 1}}, "replicas.minimum", "is not a catalog field"),
    "context-size-not-int": ({"context_size": "big"}, "context_size", "must be of type int"),
    "context-size-zero": ({"context_size": 0}, "context_size", "must be positive"),
    "scaledown-period-negative": ({"scaledown_period": -5}, "scaledown_period", "must be positive"),
    "local-port-out-of-range": ({"local_port": 70000}, "local_port", "must be a port number"),
    "gpu-layers-not-int": ({"gpu_layers": "all"}, "gpu_layers", "must be of type int"),
    "resources-not-mapping": ({"resources": "lots"}, "resources", "must be of type dict"),
    "tolerations-not-dicts": ({"tolerations": ["gpu"]}, "tolerations", "must be a list of dict"),
    "unknown-field": ({"contextsize": 4096}, "contextsize", "is not a catalog field"),
    "vulkan-without-gpu": ({"target": "vulkan"}, "gpu_vendor", "the vulkan image needs a GPU, nvidia or amd"),
    "cuda-on-amd": ({"target": "cuda", "gpu_vendor": "amd"}, "gpu_vendor", "the cuda image cannot use a GPU of amd"),
    "gpu-vendor-unknown": ({"gpu_vendor": "intel"}, "gpu_vendor", "must be one of none, nvidia, amd, got intel"),
    "gpu-count-zero": ({"target": "cuda", "gpu_count": 0}, "gpu_count", "must be positive"),
    "groups-not-ints": ({"supplemental_groups": ["render"]}, "supplemental_groups", "must be a list of int"),
    "size-zero": ({"file": "tiny.gguf", **DOWNLOAD, "size": 0}, "size", "must be a positive number of bytes"),
    "size-not-int": ({"file": "tiny.gguf", **DOWNLOAD, "size": "5G"}, "size", "must be of type int"),
    "cache-pvc-no-url": ({"cache_pvc": "gguf-cache"}, "cache_pvc", "keeps a download: it needs url"),
    "cache-pvc-bad-name": (
        {"file": "tiny.gguf", **DOWNLOAD, "cache_pvc": "Cache_1"},
        "cache_pvc",
        "must be a Persistent",
    ),
}


def deploy(catalog, **settings) -> object:
    need_collection()
    return run_playbook(
        ROOT / "playbooks" / "deploy.yml",
        {"llmpods_local_port": free_port(), **settings, "llmpods_models": catalog},
        timeout=300,
    )


def assert_refused_by_the_catalog_check(result) -> str:
    assert result.rc != 0
    failure = result.failure()
    assert failure.startswith("Check the catalog entries: The model catalog has"), failure
    assert result.changed == 0
    # Nothing after the catalog check ran: no image build, no key file, no pod, no release.
    assert result.tasks()[-1]["name"] == "Check the catalog entries"
    return failure


@pytest.mark.parametrize(("entry", "field", "expected"), list(ENTRY_ERRORS.values()), ids=list(ENTRY_ERRORS))
def test_a_bad_entry_is_refused_by_entry_and_field(entry: dict, field: str, expected: str) -> None:
    bad = {key: value for key, value in {**GOOD, "name": "badmodel", **entry}.items() if value is not None}
    failure = assert_refused_by_the_catalog_check(deploy([GOOD, bad]))
    assert not (STATE / "keys" / "badmodel.keys").exists(), "no key file for a refused catalog"
    assert f"llmpods_models[1] ({bad.get('name', 'no name')}): field {field}" in failure, failure
    assert expected in failure, failure
    assert "llmpods_models[0]" not in failure, "the good entry is not blamed"


@pytest.mark.parametrize(
    ("catalog", "expected"),
    [
        ("just-a-string", "llmpods_models: must be a list of models"),
        ([], "llmpods_models: the catalog is empty"),
        ([GOOD, "smollm2"], 'llmpods_models[1]: must be a mapping, got "smollm2"'),
        ([GOOD, GOOD], 'llmpods_models: field name "smollm2" appears more than once'),
    ],
    ids=["not-a-list", "empty", "entry-not-mapping", "duplicate-name"],
)
def test_a_bad_catalog_is_refused(catalog, expected: str) -> None:
    failure = assert_refused_by_the_catalog_check(deploy(catalog))
    assert expected in failure, failure


def test_every_problem_is_reported_at_once() -> None:
    bad = [{**GOOD, "name": "one", "target": "tpu"}, {**GOOD, "name": "two", "context_size": 0}]
    failure = assert_refused_by_the_catalog_check(deploy(bad))
    assert "has 2 problem(s)" in failure, failure
    assert (
        "llmpods_models[0] (one): field target" in failure and "llmpods_models[1] (two): field context_size" in failure
    )


KUBERNETES = {"llmpods_target": "kubernetes", "llmpods_ingress_host": "llm.example.test"}


@pytest.mark.parametrize(
    ("entry", "field", "expected"),
    [
        ({"file": "big.gguf"}, "file", "on Kubernetes the entry needs url (+ sha256), host_path or pvc"),
        ({"file": "big.gguf", "url": DOWNLOAD["url"], "sha256": "xyz"}, "sha256", "must be 64 hex digits"),
        ({"target": "tpu", "host_path": "/srv/models"}, "target", "must be one of cpu, cuda, rocm, vulkan"),
    ],
    ids=["no-source", "bad-sha256", "target-unknown"],
)
def test_a_bad_entry_is_refused_on_kubernetes(entry: dict, field: str, expected: str) -> None:
    good = {**GOOD, "host_path": "/srv/models"}
    bad = {**GOOD, "name": "badmodel", **entry}
    failure = assert_refused_by_the_catalog_check(deploy([good, bad], **KUBERNETES))
    assert f"llmpods_models[1] (badmodel): field {field}" in failure, failure
    assert expected in failure, failure
