"""The chart as shipped: every values file under ci/ (the chart-testing convention) lints and renders valid
objects, and `helm package` leaves ci/ out, as .helmignore says."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from conftest import need
from helpers.chart import CHART, by_kind, helm, helm_binary, template, validate

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture(scope="module", autouse=True)
def helm_installed() -> None:
    need(helm_binary() is not None, "helm (make helm)")


def test_the_chart_ships_ci_values_for_each_model_source() -> None:
    assert [p.name for p in CI_VALUES] == ["download-values.yaml", "hostpath-values.yaml", "pvc-values.yaml"]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_strict(values_file: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", str(values_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_helm_template_renders_valid_objects(values_file: Path) -> None:
    docs = template(values_file=values_file)
    validate(docs)
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert {c["name"] for c in pod["containers"]} == {"inference", "gateway"}


def test_lint_without_values_names_what_is_missing() -> None:
    """The defaults alone are not a deployment: lint says so instead of rendering a pod without a model."""
    proc = helm("lint", str(CHART))
    assert proc.returncode != 0
    assert "model" in proc.stdout + proc.stderr


def test_package_leaves_ci_out(tmp_path: Path) -> None:
    proc = helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [archive] = tmp_path.glob("llm-inference-*.tgz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "llm-inference/values.yaml" in names
    assert not [n for n in names if n.startswith("llm-inference/ci/")]
