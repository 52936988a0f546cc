"""A small asyncio HTTP client for the API server, built from a kubeconfig (certificate or token).

The harness's own reads, watches and bulk writes, and the limit client's writes, go through it: a plain
aiohttp session with no cache, no queue and no client-side rate limit.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from kaos_modelapi.kube import accept_for

Obj = dict[str, Any]
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

# kind -> (API path prefix, plural) of everything the harness and the limit client touch.
KINDS: dict[str, tuple[str, str]] = {
    "ModelAPI": ("/apis/kaos.tools/v1alpha1", "modelapis"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes"),
    "Event": ("/api/v1", "events"),
    "Namespace": ("/api/v1", "namespaces"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings"),
    "FlowSchema": ("/apis/flowcontrol.apiserver.k8s.io/v1", "flowschemas"),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions"),
}


def path(kind: str, namespace: str | None, name: str = "", subresource: str = "") -> str:
    prefix, plural = KINDS[kind]
    ns = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    sub = f"/{subresource}" if subresource else ""
    return f"{prefix}{ns}/{plural}{tail}{sub}"


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status


@dataclass
class Api:
    host: str
    ssl_context: ssl.SSLContext
    headers: dict[str, str]
    session: aiohttp.ClientSession | None = None

    @classmethod
    async def from_kubeconfig(cls, kubeconfig: str, user_agent: str = "kaos-bench") -> Api:
        conf = k8s_client.Configuration()
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
        ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert)
        if conf.cert_file:
            ctx.load_cert_chain(conf.cert_file, conf.key_file)
        headers = {"User-Agent": user_agent}
        token = (conf.api_key or {}).get("authorization") or (conf.api_key or {}).get("BearerToken")
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        return cls(str(conf.host), ctx, headers)

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=64)
            self.session = aiohttp.ClientSession(connector=connector, headers=self.headers)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(self, method: str, url_path: str, body: Any = None, *, query: dict[str, str] | None = None,
                      content_type: str = "application/json", missing_ok: bool = False,
                      accept: str = "application/json") -> Obj:
        data = None if body is None else (json.dumps(body) if not isinstance(body, str) else body)
        headers = {"Content-Type": content_type, "Accept": accept}
        async with self._session().request(method, self.host + url_path, data=data, params=query,
                                           headers=headers) as resp:
            text = await resp.text()
            if resp.status == 404 and missing_ok:
                return {}
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            result: Obj = json.loads(text) if text else {}
            return result

    async def get(self, kind: str, namespace: str | None, name: str = "", **query: str) -> Obj:
        return await self.request("GET", path(kind, namespace, name), query=query or None)

    async def create(self, obj: Obj, *, metadata_only: bool = False) -> Obj:
        meta = obj["metadata"]
        return await self.request("POST", path(obj["kind"], meta.get("namespace")), obj,
                                  accept=accept_for(metadata_only))

    async def apply(self, obj: Obj, manager: str, *, status: bool = False, force: bool = True,
                    metadata_only: bool = False) -> Obj:
        """``metadata_only``: the answer is the object's metadata alone (PartialObjectMetadata), as the operator
        asks for it when it does not read the answer."""
        meta = obj["metadata"]
        query = {"fieldManager": manager, "force": "true" if force else "false"}
        url = path(obj["kind"], meta.get("namespace"), meta["name"], "status" if status else "")
        return await self.request("PATCH", url, obj, query=query, content_type=APPLY,
                                  accept=accept_for(metadata_only))

    async def raw(self, url_path: str) -> str:
        async with self._session().get(self.host + url_path) as resp:
            return await resp.text()

    async def watch(self, url_path: str, on_event: Callable[[str, Obj, float], Awaitable[None] | None],
                    ready: asyncio.Event | None = None) -> None:
        """List, then watch from the list's resourceVersion, calling on_event(type, object, monotonic time) for
        every object listed (as ADDED) and every event, until cancelled. A stream that ends or fails (a dropped
        connection, an ERROR event such as 410 Gone, a busy server) is started again from a new list, so no
        change is missed: its objects come again as ADDED."""
        while True:
            try:
                await self._list_and_watch(url_path, on_event, ready)
            except ApiError as e:
                # 404: a new CRD's storage starting; 410: too old a version; 429, 5xx: a busy server
                if e.status not in (404, 410, 429) and e.status < 500:
                    raise
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass  # the connection dropped or a line was cut: list again
            await asyncio.sleep(0.5)

    async def _list_and_watch(self, url_path: str, on_event: Callable[[str, Obj, float], Awaitable[None] | None],
                              ready: asyncio.Event | None) -> None:
        listed = await self.request("GET", url_path)
        for item in listed.get("items", []):
            await _call(on_event, "ADDED", item, time.monotonic())
        if ready is not None:
            ready.set()
        version = listed["metadata"]["resourceVersion"]
        query = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": "3600"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self._session().get(self.host + url_path, params=query, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    await _call(on_event, event["type"], event["object"], time.monotonic())
                elif event["type"] == "ERROR":  # e.g. 410 Gone: this version is too old to watch from
                    return


async def _call(fn: Callable[[str, Obj, float], Awaitable[None] | None], *args: Any) -> None:
    result = fn(*args)
    if result is not None:
        await result


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], concurrency: int) -> None:
    """Run the jobs with at most `concurrency` at once; the first error is raised."""
    it = iter(jobs)

    async def worker() -> None:
        for job in it:
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
