"""The route to the KEDA interceptor that the keda_ingress role renders, checked against the schemas a cluster uses.

Both kinds: an Ingress with its ExternalName Service (kubernetes-validate, strict), and a Gateway API HTTPRoute with
its ReferenceGrant (jsonschema against the CRDs in tests/schemas/gateway-api/, unknown fields are errors). The edge
timeouts come from the two time budgets and the edge body limit is the gateway's; the deploy playbook refuses the
settings that would route into a dead end before it changes anything.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT, need_collection, run_playbook
from helpers.chart import CHART, _strict, validate

GATEWAY_SCHEMAS = ROOT / "tests" / "schemas" / "gateway-api"
PLAYBOOK = ROOT / "tests" / "unit" / "playbooks" / "keda_ingress_manifests.yml"
HOST = "llm.example.test"


@functools.cache
def gateway_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for path in sorted(GATEWAY_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version["served"]:
                continue
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
            validators[(f"{group}/{version['name']}", kind)] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validators


def validate_gateway(doc: dict) -> None:
    validator = gateway_validators()[(doc["apiVersion"], doc["kind"])]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{doc['kind']} {doc['metadata']['name']}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )
    if doc["kind"] == "HTTPRoute":
        # CEL rules of the CRD, which jsonschema does not run.
        for rule in doc["spec"]["rules"]:
            timeouts = rule.get("timeouts", {})
            if "request" in timeouts and "backendRequest" in timeouts:
                assert seconds(timeouts["backendRequest"]) <= seconds(timeouts["request"]), timeouts


def seconds(duration: str) -> int:
    assert duration.endswith("s") and duration[:-1].isdigit(), duration
    return int(duration[:-1])


def render(tmp_path: Path, **settings: object) -> list[dict]:
    """Render the role's manifests entry point with these variables and return the objects, each validated."""
    need_collection()
    result = run_playbook(PLAYBOOK, {"keda_ingress_host": HOST, "keda_ingress_manifest_dir": str(tmp_path), **settings})
    assert result.rc == 0, result.failure()
    docs = yaml.safe_load((tmp_path / "manifests.yml").read_text())
    for doc in docs:
        if doc["apiVersion"].startswith("gateway.networking.k8s.io/"):
            validate_gateway(doc)
        else:
            validate([doc])
    return docs


def refused(tmp_path: Path, **settings: object) -> str:
    result = run_playbook(PLAYBOOK, {"keda_ingress_host": HOST, "keda_ingress_manifest_dir": str(tmp_path), **settings})
    assert result.rc != 0
    assert not (tmp_path / "manifests.yml").exists()
    return result.failure()


def kinds(docs: list[dict]) -> list[str]:
    return [doc["kind"] for doc in docs]


# --- kind ingress


def test_ingress_routes_the_host_to_the_interceptor(tmp_path: Path) -> None:
    """The ExternalName Service names the interceptor in the KEDA namespace, and the Ingress sends the host to it."""
    docs = render(
        tmp_path,
        keda_ingress_tls_secret="llm-example-test-tls",  # noqa: S106 - the name of a Secret
        keda_ingress_class_name="nginx",
        keda_ingress_namespace="edge",
        keda_ingress_keda_namespace="autoscaling",
    )
    assert kinds(docs) == ["Service", "Ingress"]
    service, ingress = docs
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == ("keda-interceptor", "edge")
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] == "keda-add-ons-http-interceptor-proxy.autoscaling.svc.cluster.local"
    assert service["spec"]["ports"][0]["port"] == 8080
    spec = ingress["spec"]
    assert ingress["metadata"]["namespace"] == "edge"
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": [HOST], "secretName": "llm-example-test-tls"}]
    rule = spec["rules"][0]
    assert rule["host"] == HOST
    assert rule["http"]["paths"] == [
        {
            "path": "/",
            "pathType": "Prefix",
            "backend": {"service": {"name": "keda-interceptor", "port": {"number": 8080}}},
        }
    ]


def test_ingress_edge_limits_follow_the_budgets_and_the_gateway(tmp_path: Path) -> None:
    """Defaults: a cold start (600 s) plus a generation (300 s) plus the margin (60 s); the gateway's body limit."""
    chart_body_size = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["config"]["clientMaxBodySize"]
    annotations = render(tmp_path)[1]["metadata"]["annotations"]
    assert annotations == {
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "960",
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "960",
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        "nginx.ingress.kubernetes.io/proxy-body-size": chart_body_size,
    }


def test_ingress_edge_limits_of_other_budgets(tmp_path: Path) -> None:
    annotations = render(
        tmp_path,
        keda_ingress_cold_start_seconds=1800,
        keda_ingress_generation_seconds=900,
        keda_ingress_timeout_margin_seconds=30,
        keda_ingress_body_size="2m",
    )[1]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "2730"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "2730"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "2m"


def test_ingress_annotations_of_the_user_win(tmp_path: Path) -> None:
    annotations = render(
        tmp_path,
        keda_ingress_annotations={"nginx.ingress.kubernetes.io/proxy-buffering": "on", "example.test/owner": "team-a"},
    )[1]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "on"
    assert annotations["example.test/owner"] == "team-a"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "960"


def test_ingress_without_tls_class_or_annotations(tmp_path: Path) -> None:
    ingress = render(tmp_path, keda_ingress_nginx_annotations=False)[1]
    assert "tls" not in ingress["spec"] and "ingressClassName" not in ingress["spec"]
    assert "annotations" not in ingress["metadata"]


def test_ingress_in_the_keda_namespace_uses_the_interceptor_directly(tmp_path: Path) -> None:
    """No ExternalName Service where none is needed (hardened controllers refuse them)."""
    docs = render(tmp_path, keda_ingress_namespace="keda")
    assert kinds(docs) == ["Ingress"]
    backend = docs[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": "keda-add-ons-http-interceptor-proxy", "port": {"number": 8080}}}


# --- kind httproute


def test_httproute_routes_the_host_to_the_interceptor(tmp_path: Path) -> None:
    """The HTTPRoute attaches to the named Gateway, its backend is the interceptor's Service in the KEDA namespace,
    and the ReferenceGrant there allows exactly that reference; no ExternalName Service."""
    docs = render(
        tmp_path,
        keda_ingress_kind="httproute",
        keda_ingress_namespace="edge",
        keda_ingress_keda_namespace="autoscaling",
        keda_ingress_gateway_name="public",
        keda_ingress_gateway_namespace="gateways",
        keda_ingress_gateway_section="https",
    )
    assert kinds(docs) == ["HTTPRoute", "ReferenceGrant"]
    route, grant = docs
    assert (route["metadata"]["name"], route["metadata"]["namespace"]) == ("llmpods", "edge")
    spec = route["spec"]
    assert spec["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "public",
            "namespace": "gateways",
            "sectionName": "https",
        }
    ]
    assert spec["hostnames"] == [HOST]
    (rule,) = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    (backend,) = rule["backendRefs"]
    assert backend == {
        "group": "",
        "kind": "Service",
        "name": "keda-add-ons-http-interceptor-proxy",
        "namespace": "autoscaling",
        "port": 8080,
    }
    assert rule["timeouts"] == {"request": "960s", "backendRequest": "960s"}
    # The grant lives beside the interceptor and allows HTTPRoutes of the route's namespace to use its Service.
    assert grant["metadata"]["namespace"] == backend["namespace"]
    assert grant["spec"]["from"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": route["metadata"]["namespace"]}
    ]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": backend["name"]}]


def test_httproute_timeouts_follow_the_budgets(tmp_path: Path) -> None:
    route = render(
        tmp_path,
        keda_ingress_kind="httproute",
        keda_ingress_gateway_name="public",
        keda_ingress_cold_start_seconds=1200,
        keda_ingress_generation_seconds=600,
    )[0]
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "1860s", "backendRequest": "1860s"}
    # An empty Gateway namespace is the route's own.
    assert route["spec"]["parentRefs"][0]["namespace"] == "llmpods"
    assert "sectionName" not in route["spec"]["parentRefs"][0]


def test_httproute_in_the_keda_namespace_needs_no_grant(tmp_path: Path) -> None:
    docs = render(
        tmp_path, keda_ingress_kind="httproute", keda_ingress_gateway_name="public", keda_ingress_namespace="keda"
    )
    assert kinds(docs) == ["HTTPRoute"]


def test_the_gateway_schemas_refuse_what_a_cluster_refuses() -> None:
    """The vendored CRDs are strict: a misspelt field or a duration the API server refuses fails validation."""
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llmpods"},
        "spec": {
            "parentRefs": [{"name": "public"}],
            "rules": [{"backendRefs": [{"name": "svc", "port": 8080}], "timeouts": {"request": "960s"}}],
        },
    }
    validate_gateway(route)
    with pytest.raises(AssertionError, match="timeout"):
        validate_gateway({**route, "spec": {**route["spec"], "rules": [{"timeout": {"request": "960s"}}]}})
    with pytest.raises(AssertionError, match="does not match"):
        validate_gateway({**route, "spec": {**route["spec"], "rules": [{"timeouts": {"request": "16 minutes"}}]}})


# --- refusals


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"keda_ingress_kind": "gateway"}, "keda_ingress_kind must be one of: ingress, httproute"),
        ({"keda_ingress_kind": "httproute"}, "an httproute needs the Gateway it attaches to"),
        ({"keda_ingress_body_size": "10 MB"}, "keda_ingress_body_size\nan nginx size"),
        ({"keda_ingress_cold_start_seconds": 0}, "must be positive seconds"),
        ({"keda_ingress_cold_start_seconds": 99999}, "their sum at most 99999"),
    ],
    ids=["unknown-kind", "httproute-without-gateway", "body-size", "no-cold-start", "too-long-for-a-duration"],
)
def test_refused_settings(tmp_path: Path, settings: dict, message: str) -> None:
    need_collection()
    failure = " ".join(refused(tmp_path, **settings).split())
    assert " ".join(message.split()) in failure, failure


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"llmpods_autoscaling_api": "none"}, "with llmpods_autoscaling_api=none it would answer 404 for every model"),
        ({"llmpods_ingress_kind": "httproute"}, "httproute needs llmpods_gateway_ref"),
        ({"llmpods_ingress_kind": "httproute", "llmpods_gateway_ref": "traefik"}, "as <namespace>/<name>"),
        ({"llmpods_ingress_kind": "loadbalancer"}, "llmpods_ingress_kind must be ingress or httproute"),
    ],
    ids=["no-autoscaler", "httproute-without-gateway", "gateway-ref-without-namespace", "unknown-kind"],
)
def test_deploy_refuses_a_route_into_a_dead_end(settings: dict, message: str) -> None:
    """The deploy playbook's first check: nothing is built, deployed or written before it."""
    need_collection()
    result = run_playbook(
        ROOT / "playbooks" / "deploy.yml",
        {
            "llmpods_target": "kubernetes",
            "llmpods_ingress": True,
            "llmpods_ingress_host": HOST,
            "llmpods_kubeconfig": "/nonexistent/kubeconfig",
            **settings,
        },
        timeout=300,
    )
    assert result.rc != 0
    assert " ".join(message.split()) in " ".join(result.failure().split()), result.failure()
    assert result.changed == 0
    assert {task["name"] for task in result.tasks()} <= {
        "Check the route settings",
        "Refuse a route to the interceptor without an autoscaler",
    }
