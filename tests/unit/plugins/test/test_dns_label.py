"""The dns_label test plugin: the one home of the DNS-label rule on the Ansible side, held to the chart's copy."""

from __future__ import annotations

import pytest
from conftest import need
from helpers.chart import CHART, helm, helm_binary
from helpers.env import plugin

dns_label_module = plugin("test", "dns_label")
dns_label = dns_label_module.TestModule().tests()["dns_label"]

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


@pytest.mark.parametrize(("value", "expected"), CASES.items(), ids=[repr(v)[:20] for v in CASES])
def test_dns_label(value: str, expected: bool) -> None:
    assert dns_label(value) is expected


@pytest.mark.parametrize("value", [None, 7, ["smollm2"], {"name": "smollm2"}])
def test_only_strings_are_labels(value) -> None:
    assert dns_label(value) is False


@pytest.mark.parametrize(("value", "expected"), CASES.items(), ids=[repr(v)[:20] for v in CASES])
def test_the_chart_agrees(value: str, expected: bool) -> None:
    """The chart keeps its own copy in values.schema.json (it is used without Ansible); helm, which checks it with
    Go's regular expressions, says the same of every case."""
    need(helm_binary() is not None, "helm (make helm)")
    values = {
        "model": {"name": value, "file": "m.gguf", "source": {"type": "hostPath", "hostPath": {"path": "/srv/models"}}},
        "gateway": {"config": {"nginxConf": "events {}\n", "gatewayJs": "export default {};\n"}},
        "apiKeys": {"keys": ["sk-llmpods-unit-7d41c09be26a5f38"]},
    }
    proc = helm("template", "llm-model", str(CHART), values=values)
    assert (proc.returncode == 0) is expected, proc.stderr
    if not expected:
        assert "model.name" in proc.stderr or "model/name" in proc.stderr, proc.stderr
