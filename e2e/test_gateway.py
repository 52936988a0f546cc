"""The Gateway on the real node: Traefik (e2e/traefik.py, built from its Go module) implements Gateway API
there, and a request to /<namespace>/modelapi/<name>/v1/chat/completions on the Gateway reaches the
ModelAPI's LiteLLM pod with the prefix rewritten away.

The session operator (e2e/conftest.py) writes an HTTPRoute per ModelAPI on the Gateway `shared` in
`gateway-system`, which the real node creates with its GatewayClass when it starts. What is checked is
what a user checks: the conditions Traefik writes on the GatewayClass, the Gateway and the HTTPRoute, the
Gateway's address, and the answer to a request sent there from this machine (the Gateway's address is the
node's, which the host reaches through the node's veth, as it reaches pods).

Not checked, because Traefik does not do it: the route's `timeouts.request`. Traefik v3.7 accepts the field
and ignores it (see e2e/gateway/README.md), so a backend slower than the route's timeout is not cut there.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from e2e import node, traefik
from e2e.node import Net
from e2e.operator_process import GATEWAY_NAME, GATEWAY_NAMESPACE, Kubectl, OperatorProcess, wait_until
from kaos_modelapi.desired import workload_name

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]

MOCK_MODEL = "gpt-4.6-turbo"
READY_TIMEOUT = 300.0  # a LiteLLM pod's cold start on two shared cores, beside other sessions
ROUTE_TIMEOUT = 60.0  # Traefik's provider throttles and reloads; a route shows up within seconds


def conditions_true(conditions: list[Obj], *kinds: str) -> bool:
    true = {c.get("type") for c in conditions if c.get("status") == "True"}
    return all(k in true for k in kinds)


def is_true(obj: Obj | None, *kinds: str) -> bool:
    """Whether an object's status.conditions have every one of `kinds` True."""
    return conditions_true(((obj or {}).get("status") or {}).get("conditions") or [], *kinds)


def gateway_url(kubectl: Kubectl) -> str:
    """Where a user sends requests: the Gateway's status address and its HTTP listener's port."""
    def programmed() -> Obj | None:
        gw = kubectl.get("gateway", GATEWAY_NAME, GATEWAY_NAMESPACE)
        return gw if is_true(gw, "Accepted", "Programmed") and (gw or {})["status"].get("addresses") else None

    gw: Obj = wait_until(programmed, ROUTE_TIMEOUT, f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} Programmed")
    (listener,) = [x for x in gw["spec"]["listeners"] if x["protocol"] == "HTTP"]
    return f"http://{gw['status']['addresses'][0]['value']}:{listener['port']}"


def post(url: str, body: Obj) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def mock_modelapi(name: str) -> Obj:
    return {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": name},
            "spec": {"mode": "Proxy", "proxyConfig": {"model": MOCK_MODEL}, "podSpec": node.on_real_node({}),
                     "gatewayRoute": {"timeout": "30s"}}}


def route_accepted(kubectl: Kubectl, namespace: str, name: str) -> Obj | None:
    """The HTTPRoute's status for our Gateway, once Traefik accepted it and resolved its backend."""
    route = kubectl.get("httproute", workload_name(name), namespace)
    for parent in ((route or {}).get("status") or {}).get("parents") or []:
        ref = parent.get("parentRef") or {}
        if ref.get("name") == GATEWAY_NAME and parent.get("controllerName") == traefik.CONTROLLER \
                and conditions_true(parent.get("conditions") or [], "Accepted", "ResolvedRefs"):
            found: Obj = parent
            return found
    return None


def test_the_gateway_class_and_gateway_are_accepted_and_programmed_by_traefik(
        kubectl: Kubectl, real_node: Net) -> None:
    def accepted() -> Obj | None:
        gc = kubectl.get("gatewayclass", traefik.GATEWAY_CLASS, "")
        return gc if is_true(gc, "Accepted") else None

    gc = wait_until(accepted, ROUTE_TIMEOUT, f"GatewayClass {traefik.GATEWAY_CLASS} Accepted")
    assert gc["spec"]["controllerName"] == traefik.CONTROLLER
    assert gateway_url(kubectl) == f"http://{real_node.node_ip}:{traefik.PORT}"


def test_a_mock_modelapi_answers_through_the_gateway_at_its_prefixed_path(
        kubectl: Kubectl, namespace: str, crd: str, operator: OperatorProcess, node_images: dict[str, str],
        real_node: Net) -> None:
    name = "mock-gw"
    kubectl.apply(json.dumps(mock_modelapi(name)), namespace)
    status = kubectl.wait_phase(name, namespace, "Ready", READY_TIMEOUT)
    assert status["endpoint"].startswith(f"http://{workload_name(name)}.{namespace}.svc")

    parent = wait_until(lambda: route_accepted(kubectl, namespace, name), ROUTE_TIMEOUT,
                        f"HTTPRoute {namespace}/{workload_name(name)} Accepted by Traefik")
    assert parent["parentRef"]["namespace"] == GATEWAY_NAMESPACE

    base = gateway_url(kubectl)
    prefix = f"{base}/{namespace}/modelapi/{name}"
    body = {"model": MOCK_MODEL, "messages": [{"role": "user", "content": "hi"}],
            "mock_response": "answered through the Gateway"}

    def answered() -> Obj | None:
        code, text = post(f"{prefix}/v1/chat/completions", body)
        # Until Traefik has loaded the route with the pod's address it answers 404 (no router) or 503.
        return json.loads(text) if code == 200 else None

    answer = wait_until(answered, ROUTE_TIMEOUT, f"an answer at {prefix}/v1/chat/completions")
    assert answer["choices"][0]["message"]["content"] == "answered through the Gateway"
    # Outside the route's prefix, the Gateway has nothing: its 404, not LiteLLM's.
    code, _ = post(f"{base}/{namespace}/modelapi/other-{name}/v1/chat/completions", body)
    assert code == 404
