"""Acceptance tests of the local control plane (issue 2): it behaves as a real cluster where the
operator's tests rely on it, and starts, stops and fails cleanly.

The API tests use the session's cluster (fixtures in /conftest.py), so they also run against
kind or a real cluster through KUBECONFIG. The `make` tests start their own control planes in
temporary folders on free ports, so they never touch .cluster or the session's cluster.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from e2e import cluster

pytestmark = pytest.mark.cluster

PAUSE = "registry.k8s.io/pause:3.10"  # never pulled: the fake kubelet runs nothing


def deployment(name: str, replicas: int, pod_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec or {"containers": [{"name": "main", "image": PAUSE}]},
            },
        },
    }


def pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def env(**values: int) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in values.items()]


async def pods_of(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    return (await core.list_namespaced_pod(namespace, label_selector=f"app={app}")).items


# ------------------------------------------------------------------------------ workloads


async def test_deployment_becomes_available_and_scales_to_zero(api_client: client.ApiClient, namespace: str) -> None:
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    await apps.create_namespaced_deployment(namespace, deployment("web", 2))

    async def available() -> bool:
        d = await apps.read_namespaced_deployment("web", namespace)
        return d.status.available_replicas == 2

    began = time.monotonic()
    await cluster.eventually(available, timeout=60, what="2 available replicas")
    assert time.monotonic() - began < 60
    d = await apps.read_namespaced_deployment("web", namespace)
    assert {c.type: c.status for c in d.status.conditions}["Available"] == "True"
    for p in await pods_of(core, namespace, "web"):
        assert p.status.phase == "Running"
        assert p.status.pod_ip and p.spec.node_name
        assert {c.type: c.status for c in p.status.conditions}["Ready"] == "True"

    await apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 0}})

    async def no_pods() -> bool:
        return not await pods_of(core, namespace, "web")

    await cluster.eventually(no_pods, timeout=60, what="the pods to be removed")


async def test_deleting_a_deployment_collects_its_replicaset_and_pods(
    api_client: client.ApiClient, namespace: str
) -> None:
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    created = await apps.create_namespaced_deployment(namespace, deployment("gc", 2))

    async def owned_pods() -> list[client.V1Pod]:
        pods = await pods_of(core, namespace, "gc")
        return pods if len(pods) == 2 else []

    pods = await cluster.eventually(owned_pods, timeout=60, what="2 pods")
    replicasets = (await apps.list_namespaced_replica_set(namespace, label_selector="app=gc")).items
    assert len(replicasets) == 1
    assert replicasets[0].metadata.owner_references[0].uid == created.metadata.uid
    assert all(p.metadata.owner_references[0].uid == replicasets[0].metadata.uid for p in pods)

    await apps.delete_namespaced_deployment("gc", namespace)  # default propagation: background

    async def collected() -> bool:
        rs = (await apps.list_namespaced_replica_set(namespace, label_selector="app=gc")).items
        return not rs and not await pods_of(core, namespace, "gc")

    await cluster.eventually(collected, timeout=60, what="the ReplicaSet and pods to be collected")


# ------------------------------------------------------------------------------ API semantics


async def test_server_side_apply_tracks_managers_and_conflicts(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    apply = {"_content_type": "application/apply-patch+yaml"}
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}}
    await core.patch_namespaced_config_map("ssa", namespace, body, field_manager="alice", **apply)

    with pytest.raises(ApiException) as conflict:
        other = {**body, "data": {"a": "2"}}
        await core.patch_namespaced_config_map("ssa", namespace, other, field_manager="bob", **apply)
    assert conflict.value.status == 409

    shared = {**body, "data": {"b": "x"}}
    cm = await core.patch_namespaced_config_map("ssa", namespace, shared, field_manager="bob", **apply)
    assert cm.data == {"a": "1", "b": "x"}
    assert {m.manager for m in cm.metadata.managed_fields} == {"alice", "bob"}
    assert all(m.operation == "Apply" for m in cm.metadata.managed_fields)


def widget_crd(group: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "replicas": {"type": "integer"},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.replicas <= self.maxReplicas",
                                            "message": "replicas must not exceed maxReplicas",
                                        }
                                    ],
                                },
                                "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                            },
                        }
                    },
                }
            ],
        },
    }


async def test_crd_status_subresource_and_cel_validation(api_client: client.ApiClient, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    group = f"t{secrets.token_hex(4)}.e2e.kaos.tools"
    crd = widget_crd(group)
    await ext.create_custom_resource_definition(crd)
    try:

        async def established() -> bool:
            got = await ext.read_custom_resource_definition(crd["metadata"]["name"])
            return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

        await cluster.eventually(established, timeout=30, what="the CRD to be established")
        args = (group, "v1", namespace, "widgets")

        async def create(name: str, replicas: int) -> dict[str, Any]:
            obj = {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"replicas": replicas, "maxReplicas": 2},
                "status": {"phase": "ignored"},
            }
            created: dict[str, Any] = await custom.create_namespaced_custom_object(*args, obj)
            return created

        # The API can take a moment to serve a just-established CRD.
        async def rejected() -> ApiException | None:
            try:
                await create("too-many", 3)
            except ApiException as err:
                return err if err.status == 422 else None
            raise AssertionError("a Widget that breaks the CEL rule was accepted")

        err = await cluster.eventually(rejected, timeout=30, what="the CEL rule to reject a Widget")
        assert "replicas must not exceed maxReplicas" in err.body

        w = await create("ok", 1)
        assert "status" not in w  # the main resource ignores status
        w["status"] = {"phase": "Ready"}
        w["spec"]["replicas"] = 2
        updated = await custom.replace_namespaced_custom_object_status(*args, "ok", w)
        assert updated["status"] == {"phase": "Ready"}
        assert updated["spec"]["replicas"] == 1  # the status subresource ignores spec
    finally:
        await ext.delete_custom_resource_definition(crd["metadata"]["name"])


async def test_watch_sends_bookmarks(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="watched"))
    created = await core.create_namespaced_config_map(namespace, body)
    events: list[tuple[str, Any]] = []
    # The watch cache sends a bookmark shortly before the watch's timeout, at the latest; on a loaded
    # machine a short watch can end first, so a few watches are allowed (each from the same version).
    async with asyncio.timeout(60):
        for _ in range(5):
            async for event in watch.Watch().stream(
                core.list_namespaced_config_map,
                namespace,
                allow_watch_bookmarks=True,
                resource_version=created.metadata.resource_version,
                timeout_seconds=4,
            ):
                events.append((event["type"], event["raw_object"]))
                if event["type"] == "BOOKMARK":
                    break
            if any(t == "BOOKMARK" for t, _ in events):
                break
    kinds = [t for t, _ in events]
    assert "BOOKMARK" in kinds, kinds
    bookmark = next(obj for t, obj in events if t == "BOOKMARK")
    assert int(bookmark["metadata"]["resourceVersion"]) >= int(created.metadata.resource_version)


async def test_httproute_with_request_timeout_is_accepted(api_client: client.ApiClient, namespace: str) -> None:
    custom = client.CustomObjectsApi(api_client)
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llm"},
        "spec": {
            "parentRefs": [{"name": "gateway"}],
            "rules": [
                {
                    "backendRefs": [{"name": "modelapi-llm", "port": 8000}],
                    "timeouts": {"request": "300s", "backendRequest": "290s"},
                }
            ],
        },
    }
    created = await custom.create_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", namespace, "httproutes", route
    )
    # Unknown fields would have been pruned: the field is in the installed schema.
    assert created["spec"]["rules"][0]["timeouts"] == {"request": "300s", "backendRequest": "290s"}


async def test_apiserver_metrics_count_requests_by_verb_and_resource(
    api_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)

    async def creates() -> float:
        resp = await api_client.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False)
        text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("apiserver_request_total{")
                and 'resource="configmaps"' in line
                and 'verb="POST"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = await creates()
    for i in range(3):
        await core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"m{i}"))
        )
    assert await creates() - before >= 3


# ------------------------------------------------------------------------------ fake kubelet


async def test_init_container_held_running_for_the_requested_time(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    spec = {
        "initContainers": [{"name": "pull-model", "image": PAUSE, "env": env(KAOS_FAKE_RUN_SECONDS=4)}],
        "containers": [{"name": "main", "image": PAUSE}],
    }
    await core.create_namespaced_pod(namespace, pod("held", spec))

    async def init_running() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("held", namespace)
        statuses = p.status.init_container_statuses or []
        return p if statuses and statuses[0].state.running else None

    p = await cluster.eventually(init_running, timeout=30, what="the init container to run")
    conditions = {c.type: c.status for c in p.status.conditions}
    assert p.status.phase == "Pending"
    assert conditions["Initialized"] == "False" and conditions["Ready"] == "False"
    assert p.status.container_statuses[0].state.waiting.reason == "PodInitializing"

    async def ready() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("held", namespace)
        return p if {c.type: c.status for c in p.status.conditions}.get("Ready") == "True" else None

    p = await cluster.eventually(ready, timeout=30, what="the pod to become Ready")
    done = p.status.init_container_statuses[0].state.terminated
    assert done.exit_code == 0 and done.reason == "Completed"
    assert (done.finished_at - done.started_at).total_seconds() >= 4
    assert p.status.phase == "Running"


async def test_failing_containers_crash_loop_or_fail_the_pod(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    crashing = {"containers": [{"name": "main", "image": PAUSE, "env": env(KAOS_FAKE_EXIT_CODE=3)}]}
    init_failing = {
        "initContainers": [{"name": "pull-model", "image": PAUSE, "env": env(KAOS_FAKE_EXIT_CODE=1)}],
        "containers": [{"name": "main", "image": PAUSE}],
    }
    once = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": PAUSE, "env": env(KAOS_FAKE_EXIT_CODE=2)}],
    }
    for name, spec in [("crashing", crashing), ("init-failing", init_failing), ("once", once)]:
        await core.create_namespaced_pod(namespace, pod(name, spec))

    def restarted_twice(statuses: list[client.V1ContainerStatus] | None) -> client.V1ContainerStatus | None:
        s = (statuses or [None])[0]
        return s if s is not None and s.restart_count >= 2 and s.state.waiting else None

    async def crash_looping() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("crashing", namespace)
        return p if restarted_twice(p.status.container_statuses) else None

    p = await cluster.eventually(crash_looping, timeout=30, what="a crash-looping container")
    s = p.status.container_statuses[0]
    assert s.state.waiting.reason == "CrashLoopBackOff"
    assert s.last_state.terminated.exit_code == 3 and s.last_state.terminated.reason == "Error"
    assert not s.ready and p.status.phase == "Running"
    assert {c.type: c.status for c in p.status.conditions}["Ready"] == "False"

    async def init_crash_looping() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("init-failing", namespace)
        return p if restarted_twice(p.status.init_container_statuses) else None

    p = await cluster.eventually(init_crash_looping, timeout=30, what="a crash-looping init container")
    s = p.status.init_container_statuses[0]
    assert s.state.waiting.reason == "CrashLoopBackOff" and s.last_state.terminated.exit_code == 1
    assert p.status.phase == "Pending"
    assert p.status.container_statuses[0].state.waiting.reason == "PodInitializing"

    async def failed() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("once", namespace)
        return p if p.status.phase == "Failed" else None

    p = await cluster.eventually(failed, timeout=30, what="the pod to fail")
    assert p.status.container_statuses[0].state.terminated.exit_code == 2


async def test_unschedulable_pod_stays_pending(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    gpu = {"containers": [{"name": "main", "image": PAUSE, "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    await core.create_namespaced_pod(namespace, pod("gpu", gpu))

    async def unschedulable() -> client.V1PodCondition | None:
        p = await core.read_namespaced_pod("gpu", namespace)
        return next((c for c in p.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None)

    condition = await cluster.eventually(unschedulable, timeout=30, what="PodScheduled=False")
    assert condition.reason == "Unschedulable" and "nvidia.com/gpu" in condition.message


# ------------------------------------------------------------------------------ make targets


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for `make` that points it at a private state folder and free ports."""
    ports = cluster.free_ports()
    state = tmp_path / "state"
    environ = {
        **os.environ,
        "KAOS_CLUSTER_DIR": str(state),
        "KAOS_APISERVER_PORT": str(ports["apiserver"]),
        "KAOS_ETCD_PORT": str(ports["etcd"]),
        "KAOS_ETCD_PEER_PORT": str(ports["etcd-peer"]),
    }
    yield environ
    subprocess.run(["make", "-s", "-C", str(cluster.REPO), "cluster-down"], env=environ, capture_output=True)


def make(target: str, environ: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(cluster.REPO), target], env=environ, capture_output=True, text=True, timeout=timeout
    )


def processes_using(state: Path) -> list[str]:
    """Command lines of live processes that mention the state folder (the control plane's do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(state).encode() in a for a in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def test_make_cluster_serves_readyz_and_cluster_down_leaves_nothing(make_env: dict[str, str]) -> None:
    state = Path(make_env["KAOS_CLUSTER_DIR"])
    ports = [int(make_env[k]) for k in ("KAOS_APISERVER_PORT", "KAOS_ETCD_PORT", "KAOS_ETCD_PEER_PORT")]
    up = make("cluster", make_env)
    assert up.returncode == 0, up.stderr
    assert (state / "kubeconfig").exists()

    kubectl = shutil.which("kubectl")
    if kubectl:
        readyz = subprocess.run(
            [kubectl, "--kubeconfig", str(state / "kubeconfig"), "get", "--raw", "/readyz"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (readyz.returncode, readyz.stdout.strip()) == (0, "ok"), readyz.stderr
    else:  # the same request without kubectl
        assert cluster.readyz(state) == "ok"

    again = make("cluster", make_env)  # a second `make cluster` reuses the running one
    assert again.returncode == 0 and "already running" in again.stdout

    assert processes_using(state) and all(listening(p) for p in ports)
    down = make("cluster-down", make_env)
    assert down.returncode == 0, down.stderr
    assert processes_using(state) == []
    assert [p for p in ports if listening(p)] == []
    assert not state.exists()


def test_port_in_use_fails_clearly_and_starts_nothing(make_env: dict[str, str]) -> None:
    state = Path(make_env["KAOS_CLUSTER_DIR"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = make("cluster", {**make_env, "KAOS_ETCD_PORT": str(port)})
    assert result.returncode != 0
    [line] = error_lines(result)
    assert f"port 127.0.0.1:{port}" in line and "KAOS_ETCD_PORT" in line, line
    assert processes_using(state) == []
    assert not (state / "pid").exists() and not (state / "etcd").exists()


def test_stale_state_folder_fails_clearly_and_cluster_down_clears_it(make_env: dict[str, str]) -> None:
    state = Path(make_env["KAOS_CLUSTER_DIR"])
    (state / "etcd").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (state / "pid").write_text(f"{dead.pid}\n")

    result = make("cluster", make_env)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "no longer running" in line and "make cluster-down" in line, line
    assert processes_using(state) == []

    down = make("cluster-down", make_env)
    assert down.returncode == 0, down.stderr
    assert not state.exists()


def test_failed_build_fails_clearly_and_caches_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(cluster.source_dir(), src, ignore=shutil.ignore_patterns("crds"))
    # A dependency that does not exist: the go command fails before it compiles anything, so
    # this stays quick even when the Go build cache is cold.
    main_go = src / "main.go"
    main_go.write_text(main_go.read_text().replace("import (\n", 'import (\n\t_ "kaos.tools/missing"\n', 1))
    environ = {**os.environ, "KAOS_CONTROLPLANE_SRC": str(src), "KAOS_CACHE_DIR": str(tmp_path / "cache")}
    result = make("controlplane", environ)
    assert result.returncode != 0
    [line] = error_lines(result)
    assert "did not build" in line and "kaos.tools/missing" in line, line
    assert not list((tmp_path / "cache").glob("*/kaos-controlplane"))


def test_metrics_need_credentials(kubeconfig: str) -> None:
    """/metrics answers the admin (test above), not an anonymous client."""
    if os.environ.get("KUBECONFIG"):
        pytest.skip("only for the local control plane")
    server = cluster.server_of(Path(kubeconfig))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/metrics", context=ctx, timeout=10)
    assert err.value.code in (401, 403)
