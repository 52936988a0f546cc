"""Fixtures shared by tests/ and e2e/: a Kubernetes API to test against.

- `kubeconfig` (session): path to an admin kubeconfig. In order of preference: $KUBECONFIG if it
  names an existing file (an existing cluster: kind, a real one), the control plane of `make cluster` if it is running
  (left running afterwards; not `make dev`'s, whose pods go to the real node by default), else a private
  control plane started for this session on free ports and stopped at its end.
- `api_client` (session): a kubernetes_asyncio ApiClient for that kubeconfig.
- `namespace` (function): a fresh namespace, ready for pods (its default ServiceAccount
  exists), deleted after the test.
- `real_node` (session): the real node (e2e/node.py) of the session's cluster. A private control
  plane gets one only when a collected test uses this fixture, so sessions that do not need it
  (and machines without root) keep the fast start.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from e2e import cluster


def _wants_real_node(session: pytest.Session) -> bool:
    return any("real_node" in getattr(item, "fixturenames", ()) for item in session.items)


def _runs_pods_on_the_real_node(state: Path) -> bool:
    """`make dev`'s cluster sends pods to the real node by default; the tests expect the stand-in there."""
    from e2e import node

    return node.is_default(state)


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest) -> Iterator[str]:
    external = os.environ.get("KUBECONFIG", "")
    if any(Path(p).is_file() for p in external.split(os.pathsep) if p):
        yield external
        return
    if cluster.is_running() and not _runs_pods_on_the_real_node(cluster.state_dir()):
        cluster.wait_ready()
        yield str(cluster.state_dir() / "kubeconfig")
        return
    state = Path(tempfile.mkdtemp(prefix="kaos-cluster-"))
    try:
        # Free ports and a private folder: other sessions and `make cluster` can run meanwhile.
        started = cluster.start(state, cluster.free_ports(), exit_with_parent=True,
                                real_node=_wants_real_node(request.session))
    except cluster.ClusterError as err:
        pytest.exit(f"cannot start the local control plane: {err}", returncode=1)
    try:
        yield str(started.kubeconfig)
    finally:
        cluster.stop(cluster=started)


@pytest.fixture(scope="session")
async def api_client(kubeconfig: str) -> AsyncIterator[object]:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        yield api


@pytest.fixture
async def namespace(api_client: object, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    core = client.CoreV1Api(api_client)
    await core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kaos.tools/test": "true"}))
    )

    async def default_service_account() -> bool:
        try:
            await core.read_namespaced_service_account("default", name)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    # The API refuses pods in a namespace until its default ServiceAccount exists.
    await cluster.eventually(default_service_account, timeout=30, what=f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        try:
            await core.delete_namespace(name)
        except ApiException as err:
            if err.status != 404:
                raise


@pytest.fixture(scope="session")
def real_node(kubeconfig: str) -> object:
    """The real node of the session's cluster (an e2e.node.Net); fails if the cluster has none."""
    from e2e import node

    net = node.record_for(Path(kubeconfig).parent)
    if net is None:
        pytest.fail(f"the cluster of {kubeconfig} has no real node: stop `make cluster` (or start it with "
                    "KAOS_REAL_NODE=1), or unset KUBECONFIG, so that the session starts one")
    return net


@pytest.fixture(scope="session")
def node_images(kubeconfig: str, real_node: object) -> dict[str, str]:
    """Every image of e2e/images.py (operator, LiteLLM, stub backend, client, base) imported into the real
    node under its exact ref: built once and cached, never pulled. Maps each ref to the name containerd
    stores it under."""
    from e2e import node

    return node.import_all_images(Path(kubeconfig).parent)
