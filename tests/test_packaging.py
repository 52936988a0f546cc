"""The Helm chart and the kustomize bases, rendered offline (no cluster): helm lint/template with the helm
pinned in hack/helm (built once into ~/.cache by hack/helm/build.sh), `kubectl kustomize`, and the
generated CRD copies. e2e/test_install.py applies the same renderings to a real API server."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kaos_modelapi
from kaos_modelapi import litellm, ollama
from kaos_modelapi.crd import crd_yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kaos-modelapi"
CHART_CRD = CHART / "crds" / "modelapis.kaos.tools.yaml"
KUSTOMIZE_CRD = ROOT / "config" / "crd" / "bases" / "kaos.tools_modelapis.yaml"
RELEASE, RELEASE_NS = "kaos", "kaos-system"
SECRET_VERBS = {"get", "list", "watch", "create", "patch", "delete"}
LAST_APPLIED_LIMIT = 262144  # total annotation size the API server accepts (client-side apply stores the object)

Obj = dict[str, Any]


@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm; a cold build takes a few minutes (Go module proxy), then it is cached."""
    if shutil.which("go") is None and not list((Path.home() / ".cache" / "kaos-modelapi" / "helm").glob("*/helm")):
        pytest.fail("go is needed to build the pinned helm (hack/helm/build.sh)")
    result = subprocess.run([ROOT / "hack" / "helm" / "build.sh"], capture_output=True, text=True)
    assert result.returncode == 0, f"building helm failed:\n{result.stderr}"
    return result.stdout.strip()


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result


LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is ~7000 lines: libyaml parses it 10x faster


@functools.cache
def _documents(text: str) -> str:
    return json.dumps([d for d in yaml.load_all(text, Loader=LOADER) if d])


def documents(text: str) -> list[Obj]:
    """Parsed once per text; each caller gets its own copy."""
    docs: list[Obj] = json.loads(_documents(text))
    return docs


def generated_crd() -> Obj:
    (crd,) = documents(crd_yaml())
    return crd


@functools.cache
def _rendered(*command: str | Path) -> str:
    return run(*command).stdout


def template(helm: str, *flags: str) -> list[Obj]:
    return documents(_rendered(helm, "template", RELEASE, CHART, "--namespace", RELEASE_NS, *flags))


def kustomize() -> list[Obj]:
    return documents(_rendered("kubectl", "kustomize", ROOT / "config" / "default"))


def only(objs: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> Obj:
    found = [
        o for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


def kinds(objs: list[Obj]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def container(objs: list[Obj]) -> Obj:
    deployment = only(objs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def normalized(rules: list[Obj]) -> list[tuple[Any, ...]]:
    """Rules as comparable tuples (order of rules and of list items does not matter to RBAC)."""
    return sorted(
        tuple(tuple(sorted(rule.get(k, []))) for k in ("apiGroups", "resources", "resourceNames", "verbs"))
        for rule in rules
    )


def rights(rules: list[Obj]) -> Iterator[tuple[str, str, str]]:
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    yield group, resource, verb


# --- helm lint / template ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--set", "watchNamespaces={team-a,team-b}"]], ids=["cluster", "namespaced"])
def test_helm_lint(helm: str, flags: list[str]) -> None:
    run(helm, "lint", "--strict", CHART, "--namespace", RELEASE_NS, *flags)


def test_default_install_is_cluster_wide(helm: str) -> None:
    objs = template(helm)
    assert kinds(objs) == [
        "ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"
    ]
    binding = only(objs, "ClusterRoleBinding")
    sa = only(objs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": only(objs, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": RELEASE_NS}]
    for o in objs:
        if o["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert o["metadata"]["namespace"] == RELEASE_NS, o["kind"]
    assert not any(a.startswith("--namespaces") for a in container(objs)["args"])


def test_watch_namespaces_get_a_role_each_and_no_cluster_rights(helm: str) -> None:
    objs = template(helm, "--set", "watchNamespaces={team-a,team-b}")
    assert not [o for o in objs if o["kind"].startswith("Cluster")]
    cluster_wide = only(template(helm), "ClusterRole")
    for ns in ("team-a", "team-b"):
        role = only(objs, "Role", namespace=ns)
        # all but namespaces, which only a cluster-wide operator lists (a Role cannot grant it)
        assert normalized(role["rules"]) == normalized(
            [r for r in cluster_wide["rules"] if r["resources"] != ["namespaces"]])
        binding = only(objs, "RoleBinding", namespace=ns)
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == RELEASE_NS
    lease_role = only(objs, "Role", namespace=RELEASE_NS)
    assert {r for _, r, _ in rights(lease_role["rules"])} == {"leases"}
    assert "--namespaces=team-a,team-b" in container(objs)["args"]


def test_the_deployment(helm: str) -> None:
    objs = template(helm)
    deployment = only(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objs)
    assert deployment["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == only(objs, "ServiceAccount")["metadata"]["name"]
    assert c["image"] == f"kaos-modelapi:{kaos_modelapi.__version__}"
    args = c["args"]
    assert f"--litellm-image={litellm.DEFAULT_IMAGE}" in args
    assert f"--ollama-image={ollama.DEFAULT_IMAGE}" in args
    assert {"--leader-elect", "--leader-election-id=kaos-modelapi", "--leader-election-namespace=$(POD_NAMESPACE)",
            "--log-format=json", "--log-level=info"} <= set(args)
    assert not any(a.startswith("--gateway") for a in args)
    assert c["env"][0] == {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert f"--metrics-bind-address=:{ports['metrics']}" in args
    assert f"--health-probe-bind-address=:{ports['health']}" in args
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    service = only(objs, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_the_operator_flags_exist(helm: str) -> None:
    """Every flag the chart passes is one `kaos-modelapi run` accepts."""
    from kaos_modelapi.cli import build_parser

    objs = template(helm, "--set", "watchNamespaces={a}", "--set", "gateway.name=gw",
                    "--set", "gateway.namespace=gw-ns", "--set", "gateway.sectionName=http")
    args = [a.replace("$(POD_NAMESPACE)", "kaos-system") for a in container(objs)["args"]]
    parsed = build_parser().parse_args(["run", *args])
    assert parsed.namespaces == "a"
    assert (parsed.gateway_name, parsed.gateway_namespace, parsed.gateway_section_name) == ("gw", "gw-ns", "http")
    assert parsed.leader_elect is True


def test_leader_election_can_be_turned_off_for_one_replica(helm: str) -> None:
    objs = template(helm, "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    assert not any(a.startswith("--leader-elect") for a in container(objs)["args"])
    assert not [o for o in objs if o["kind"] in {"Role", "RoleBinding"}]
    refused = run(helm, "template", RELEASE, CHART, "--set", "leaderElection.enabled=false", check=False)
    assert refused.returncode != 0
    assert "needs leaderElection.enabled" in refused.stderr


def test_a_gateway_needs_its_namespace(helm: str) -> None:
    refused = run(helm, "template", RELEASE, CHART, "--set", "gateway.name=gw", check=False)
    assert refused.returncode != 0
    assert "gateway.name needs gateway.namespace" in refused.stderr


def test_service_monitor_only_on_request_and_with_its_api(helm: str) -> None:
    assert "ServiceMonitor" not in kinds(template(helm))
    refused = run(helm, "template", RELEASE, CHART, "--set", "serviceMonitor.enabled=true", check=False)
    assert refused.returncode != 0
    assert "monitoring.coreos.com/v1" in refused.stderr
    objs = template(helm, "--set", "serviceMonitor.enabled=true",
                    "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    monitor = only(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= only(objs, "Service")["metadata"]["labels"].items()


def test_helm_template_includes_the_crd_on_request(helm: str) -> None:
    objs = template(helm, "--include-crds")
    assert only(objs, "CustomResourceDefinition") == generated_crd()


# --- generated files and pinned versions ------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHART_CRD, KUSTOMIZE_CRD], ids=["chart", "kustomize"])
def test_crd_copies_are_the_generated_crd(path: Path) -> None:
    assert path.read_text(encoding="utf-8") == crd_yaml(), f"{path.relative_to(ROOT)} is stale: run `make generate`"


def test_crd_fits_client_side_apply() -> None:
    """`kubectl apply` (client-side) stores the object in an annotation; the API server caps annotations."""
    crd = generated_crd()
    assert len(json.dumps(crd, separators=(",", ":"))) < LAST_APPLIED_LIMIT


def test_chart_versions_follow_the_code() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == kaos_modelapi.__version__
    assert f"{values['litellm']['image']['repository']}:{values['litellm']['image']['tag']}" == litellm.DEFAULT_IMAGE
    assert f"{values['ollama']['image']['repository']}:{values['ollama']['image']['tag']}" == ollama.DEFAULT_IMAGE
    manager = yaml.safe_load((ROOT / "config" / "manager" / "kustomization.yaml").read_text())
    assert manager["images"] == [{"name": "kaos-modelapi", "newTag": kaos_modelapi.__version__}]


# --- kustomize ---------------------------------------------------------------------------------------------


def test_kustomize_default_renders_the_whole_install() -> None:
    objs = kustomize()
    assert kinds(objs) == [
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "Namespace",
        "Role", "RoleBinding", "Service", "ServiceAccount",
    ]
    assert only(objs, "Namespace")["metadata"]["name"] == "kaos-system"
    for o in objs:
        if o["kind"] not in {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}:
            assert o["metadata"]["namespace"] == "kaos-system", o["kind"]
    for binding in (only(objs, "ClusterRoleBinding"), only(objs, "RoleBinding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kaos-modelapi", "namespace": "kaos-system"}]
    crd = only(objs, "CustomResourceDefinition")
    assert {k: v for k, v in crd.items() if k != "metadata"} == {
        k: v for k, v in generated_crd().items() if k != "metadata"
    }
    c = container(objs)
    assert c["image"] == f"kaos-modelapi:{kaos_modelapi.__version__}"
    assert only(objs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kustomize_and_chart_run_the_operator_alike(helm: str) -> None:
    chart, kust = container(template(helm)), container(kustomize())
    for key in ("ports", "livenessProbe", "readinessProbe", "securityContext", "env", "resources"):
        assert kust[key] == chart[key], key
    chart_pod = only(template(helm), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert only(kustomize(), "Deployment")["spec"]["template"]["spec"]["securityContext"] == chart_pod
    assert {a for a in chart["args"] if a.startswith(("--leader-elect", "--metrics", "--health"))} <= set(kust["args"])


# --- RBAC --------------------------------------------------------------------------------------------------


def test_rbac_rules_are_identical_in_chart_and_kustomize(helm: str) -> None:
    chart, kust = template(helm), kustomize()
    assert normalized(only(chart, "ClusterRole")["rules"]) == normalized(only(kust, "ClusterRole")["rules"])
    assert normalized(only(chart, "Role")["rules"]) == normalized(only(kust, "Role")["rules"])


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_rbac_is_least_privilege(helm: str, source: str) -> None:
    objs = template(helm) if source == "chart" else kustomize()
    manager = list(rights(only(objs, "ClusterRole")["rules"]))
    lease = list(rights(only(objs, "Role")["rules"]))
    for group, resource, verb in manager + lease:
        assert "*" not in (group, resource, verb)
        # update: the finalizers subresource (owner references), and the whole-object replace that mends a
        # hand edit server-side apply cannot (a duplicate list item) on the children it creates.
        assert verb not in {"escalate", "bind", "impersonate", "deletecollection", "update"} or (
            verb == "update" and resource in {"modelapis/finalizers", "deployments", "services", "configmaps",
                                              "httproutes", "poddisruptionbudgets",
                                              "persistentvolumeclaims"}
        ), (group, resource, verb)
    assert {v for g, r, v in manager if (g, r) == ("", "secrets")} <= SECRET_VERBS
    assert {(g, r) for g, r, _ in manager} == {
        ("kaos.tools", "modelapis"), ("kaos.tools", "modelapis/status"), ("kaos.tools", "modelapis/finalizers"),
        ("apps", "deployments"), ("", "services"), ("", "configmaps"), ("", "secrets"), ("", "pods"), ("", "pods/log"),
        ("gateway.networking.k8s.io", "httproutes"), ("events.k8s.io", "events"),
        ("policy", "poddisruptionbudgets"), ("", "persistentvolumeclaims"), ("", "namespaces"),
    }
    assert {v for g, r, v in manager if r == "pods"} == {"list", "watch"}
    assert {v for g, r, v in manager if r == "namespaces"} == {"list", "watch"}  # which are being deleted
    assert {v for g, r, v in manager if r == "pods/log"} == {"get"}  # a pull's progress; never exec, attach
    assert {(g, r) for g, r, _ in lease} == {("coordination.k8s.io", "leases")}
    named = [rule for rule in only(objs, "Role")["rules"] if rule.get("resourceNames")]
    assert named and all(rule["resourceNames"] == ["kaos-modelapi"] for rule in named)


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_nothing_installed_carries_the_childrens_managed_by_label(helm: str, source: str) -> None:
    """The operator selects its children by app.kubernetes.io/managed-by=kaos-modelapi: its own objects
    must not match, or it would cache (and could prune) itself."""
    objs = template(helm, "--include-crds") if source == "chart" else kustomize()
    for o in objs:
        labels = [o["metadata"].get("labels") or {}]
        if o["kind"] == "Deployment":
            labels.append(o["spec"]["template"]["metadata"].get("labels") or {})
        for group in labels:
            assert group.get("app.kubernetes.io/managed-by") != "kaos-modelapi", o["kind"]


@pytest.mark.parametrize("setting", ["logLevel=verbose", "watchNamespaces={Not_A_Namespace}", "workers=0"])
def test_values_schema_refuses_bad_values(helm: str, setting: str) -> None:
    refused = run(helm, "template", RELEASE, CHART, "--set", setting, check=False)
    assert refused.returncode != 0
    assert "values don't meet the specifications of the schema" in refused.stderr or "at '/" in refused.stderr
