"""The Gateway API route on a real cluster (`make cluster`): llmpods_ingress_kind=httproute.

The cluster's Traefik serves the Gateway traefik/traefik on the same NodePort as its Ingresses. The deploy playbook
attaches an HTTPRoute for its own host to it, with a ReferenceGrant in the KEDA namespace, and every request takes
the path a user's does: Traefik's Gateway listener -> the HTTPRoute -> the KEDA HTTP add-on interceptor -> the
model's Service -> the gateway -> the inference server. No Ingress serves this host, so an answer came through the
route. The tests run in file order and share one release in their own namespace.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import test_kubernetes_target as kubernetes_target
import yaml
from conftest import ROOT, STATE, need, run_playbook
from helpers.sse import stream_events

NAMESPACE = "llmpods-edge-route-test"
MODEL = "smollm2"
HOST = "edge-route.llmpods.test"
GATEWAY = ("traefik", "traefik")
KEDA_NAMESPACE = "keda"
ROUTE = "llmpods"
GRANT = f"{NAMESPACE}-{ROUTE}"
STATE_DIR = STATE / "edge-route-test"
GENERATION_TOKENS = 300

# The cluster fixture and the kubectl helpers of the Kubernetes target's tests.
cluster = kubernetes_target.cluster
kget, kubectl = kubernetes_target.kget, kubernetes_target.kubectl


def deploy_vars(cluster: dict[str, str], kind: str = "httproute") -> dict[str, Any]:
    # The model stays up through the tests once the deploy has woken it.
    return kubernetes_target.release_vars(
        cluster,
        NAMESPACE,
        HOST,
        STATE_DIR,
        {"scaledown_period": 900},
        llmpods_ingress_kind=kind,
        llmpods_gateway_ref="/".join(GATEWAY),
    )


def api_key() -> str:
    return (STATE_DIR / "keys" / f"{MODEL}.keys").read_text().splitlines()[0].strip()


def url(cluster: dict[str, str], path: str) -> str:
    return f"{cluster['LLMPODS_CLUSTER_INGRESS']}/{MODEL}{path}"


def headers(key: str | None = None) -> dict[str, str]:
    out = {"Host": HOST, "Content-Type": "application/json"}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def story(stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}],
        "max_tokens": GENERATION_TOKENS,
        "temperature": 0,
        "stream": stream,
    }


def names(cluster: dict[str, str], namespace: str, kinds: str) -> list[str]:
    items = kget(cluster, "-n", namespace, kinds, "-l", "app.kubernetes.io/name=keda-ingress")["items"]
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items)


def route_accepted(cluster: dict[str, str]) -> dict[str, str]:
    """The conditions the Gateway's controller set on the HTTPRoute for its parent: {type: status}."""
    route = kget(cluster, "-n", NAMESPACE, f"httproutes.gateway.networking.k8s.io/{ROUTE}")
    parents = route.get("status", {}).get("parents", [])
    for parent in parents:
        ref = parent["parentRef"]
        if (ref.get("namespace", NAMESPACE), ref["name"]) == GATEWAY:
            assert parent["controllerName"] == "traefik.io/gateway-controller", parent
            return {c["type"]: c["status"] for c in parent["conditions"]}
    return {}


@pytest.fixture(scope="module")
def routed(cluster: dict[str, str], demo_model) -> dict[str, Any]:
    need(shutil.which("docker") is not None, "the docker client, to build and push the images")
    extra = deploy_vars(cluster)
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", extra, timeout=3600)
    assert result.data is not None, f"the playbook printed no JSON result: {result.stderr[-2000:]}"
    assert result.rc == 0, result.failure()
    return {"vars": extra, "result": result}


def test_the_route_is_an_httproute_accepted_by_the_gateway(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    assert names(cluster, NAMESPACE, "ingresses,services") == [], "an httproute needs no Ingress nor ExternalName"
    assert names(cluster, NAMESPACE, "httproutes.gateway.networking.k8s.io") == [f"HTTPRoute/{ROUTE}"]
    assert names(cluster, KEDA_NAMESPACE, "referencegrants.gateway.networking.k8s.io") == [f"ReferenceGrant/{GRANT}"]
    deadline = time.monotonic() + 60
    conditions: dict[str, str] = {}
    while time.monotonic() < deadline:
        conditions = route_accepted(cluster)
        if conditions.get("Accepted") == "True" and conditions.get("ResolvedRefs") == "True":
            break
        time.sleep(2)
    # ResolvedRefs is True only when the ReferenceGrant allows the backend in the KEDA namespace.
    assert conditions.get("Accepted") == "True" and conditions.get("ResolvedRefs") == "True", conditions
    route = kget(cluster, "-n", NAMESPACE, f"httproutes.gateway.networking.k8s.io/{ROUTE}")
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "960s", "backendRequest": "960s"}


def test_a_second_run_of_the_route_changes_nothing(
    cluster: dict[str, str], routed: dict[str, Any], tmp_path: Path
) -> None:
    """The role on its own, with what the deploy passed it: check mode with diff, then a real run, change nothing."""
    playbook = tmp_path / "route.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Route the host",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {"name": "Route", "ansible.builtin.include_role": {"name": "llmpods.inference.keda_ingress"}}
                    ],
                }
            ]
        )
    )
    route_vars = {
        "keda_ingress_kind": "httproute",
        "keda_ingress_host": HOST,
        "keda_ingress_namespace": NAMESPACE,
        "keda_ingress_gateway_namespace": GATEWAY[0],
        "keda_ingress_gateway_name": GATEWAY[1],
        "keda_ingress_kubeconfig": cluster["KUBECONFIG"],
    }
    for check in (True, False):
        result = run_playbook(playbook, route_vars, check=check, diff=check, timeout=600)
        assert result.rc == 0, result.failure()
        changed = [t["name"] for t in result.tasks() if t["result"].get("changed")]
        assert result.changed == 0, f"changed (check mode: {check}): {changed}"


def test_request_without_key_gets_4xx_through_the_route(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}
    response = requests.post(url(cluster, "/v1/chat/completions"), headers=headers(), json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert "choices" not in response.text


def test_300_token_completion_arrives_whole(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    """Non-streamed: the first byte comes after the whole generation, and nothing on the route cuts it short."""
    sent = time.monotonic()
    response = requests.post(
        url(cluster, "/v1/chat/completions"), headers=headers(api_key()), json=story(stream=False), timeout=900
    )
    took = time.monotonic() - sent
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] == "length", answer
    assert answer["usage"]["completion_tokens"] == GENERATION_TOKENS, answer["usage"]
    assert answer["choices"][0]["message"]["content"].strip(), answer
    print(f"\n{GENERATION_TOKENS} tokens through the HTTPRoute in one answer: {took:.1f} s")


def test_300_token_stream_arrives_whole(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    chunks, finish, done = 0, None, False
    with requests.post(
        url(cluster, "/v1/chat/completions"),
        headers=headers(api_key()),
        json=story(stream=True),
        stream=True,
        timeout=900,
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream"), response.headers
        for event in stream_events(response.iter_lines(decode_unicode=True)):
            if event == "[DONE]":
                done = True
                break
            choice = event["choices"][0]
            if choice.get("delta", {}).get("content"):
                chunks += 1
            finish = choice.get("finish_reason") or finish
    assert done, "the stream ended without [DONE]"
    assert finish == "length"
    assert chunks >= GENERATION_TOKENS - 10, f"only {chunks} content chunks of {GENERATION_TOKENS} tokens arrived"


def test_switching_to_an_ingress_leaves_one_route(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    """A deploy with llmpods_ingress_kind=ingress replaces the HTTPRoute and its grant with the Ingress."""
    result = run_playbook(ROOT / "playbooks" / "deploy.yml", deploy_vars(cluster, kind="ingress"), timeout=3600)
    assert result.rc == 0, result.failure()
    assert names(cluster, NAMESPACE, "httproutes.gateway.networking.k8s.io") == []
    assert names(cluster, KEDA_NAMESPACE, "referencegrants.gateway.networking.k8s.io") == []
    assert names(cluster, NAMESPACE, "ingresses,services") == ["Ingress/llmpods", "Service/keda-interceptor"]
    models = requests.get(url(cluster, "/v1/models"), headers=headers(api_key()), timeout=600)
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == [MODEL]


def test_undeploy_removes_the_route(cluster: dict[str, str], routed: dict[str, Any]) -> None:
    result = run_playbook(ROOT / "playbooks" / "undeploy.yml", deploy_vars(cluster), timeout=1800)
    assert result.rc == 0, result.failure()
    kinds = "ingresses,services,httproutes.gateway.networking.k8s.io"
    assert names(cluster, NAMESPACE, kinds) == []
    assert names(cluster, KEDA_NAMESPACE, "referencegrants.gateway.networking.k8s.io") == []
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--wait=false", check=False)
