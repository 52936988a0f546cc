"""A thin, typed async dynamic client over kubernetes_asyncio's REST client.

We speak to the API server with plain JSON dicts and our own paths, headers and content types
(server-side apply, PartialObjectMetadata, raw watch streams with bookmarks) instead of the
generated typed APIs, which cannot express most of that. kubernetes_asyncio still does what it is
good at: kubeconfig/in-cluster loading, TLS and bearer-token refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import json
import os
import urllib.request
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson
import yarl
from aiohttp.abc import AbstractStreamWriter
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from kaos_modelapi import __version__
from kaos_modelapi.workqueue import BucketRateLimiter

USER_AGENT = f"kaos-modelapi/{__version__}"

JSON = "application/json"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Seconds a watch may outlast the timeoutSeconds it asked for before its connection is taken for dead.
WATCH_DEADLINE_GRACE = 30.0


def _not_leader(what: str) -> ApiError:
    return ApiError(0, "NotLeader", f"{what} not sent: this process no longer holds the leader Lease")


class _FencedBody(aiohttp.BytesPayload):
    """A write's body, which checks the write fence once more as its bytes are about to leave.

    aiohttp holds back a request's headers and sends them with the first bytes of its body, from a task
    of its own that runs after the connection is had: a process frozen (SIGSTOP, a long GC pause) anywhere
    before that point, however late, sends nothing on waking once its Lease may be someone else's. Checked
    here, a closed fence fails the request with nothing of it sent."""

    def __init__(self, value: bytes, fence: Callable[[], bool]) -> None:
        super().__init__(value)
        self._fence = fence

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        if not self._fence():
            raise _not_leader("write")
        await super().write_with_length(writer, content_length)


APPLY_PATCH = "application/apply-patch+yaml"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
PARTIAL_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

Obj = dict[str, Any]
Query = list[tuple[str, str]]
OnResponse = Callable[[str, int], None]
"""Called once per HTTP request with (method, status code); code 0 means no response arrived."""

WatchEventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]
_WATCH_EVENT_TYPES: frozenset[str] = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        """The REST path; without a namespace a namespaced resource is addressed cluster-wide."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [prefix]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{_segment(namespace)}")
        elif not self.namespaced and namespace is not None:
            raise ValueError(f"{self.kind} is cluster-scoped; got namespace {namespace!r}")
        parts.append(self.plural)
        if name is not None:
            parts.append(_segment(name))
        if subresource is not None:
            if name is None:
                raise ValueError("a subresource needs a name")
            parts.append(subresource)
        return "/".join(parts)


MODELAPI = Resource("kaos.tools", "v1alpha1", "modelapis", "ModelAPI")
DEPLOYMENT = Resource("apps", "v1", "deployments", "Deployment")
SERVICE = Resource("", "v1", "services", "Service")
CONFIGMAP = Resource("", "v1", "configmaps", "ConfigMap")
SECRET = Resource("", "v1", "secrets", "Secret")
HTTPROUTE = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
EVENT = Resource("events.k8s.io", "v1", "events", "Event")
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
NAMESPACE = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
POD = Resource("", "v1", "pods", "Pod")
PDB = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
PVC = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")

DEFAULT_RESOURCES: tuple[Resource, ...] = (
    MODELAPI,
    DEPLOYMENT,
    SERVICE,
    CONFIGMAP,
    SECRET,
    HTTPROUTE,
    EVENT,
    LEASE,
    NAMESPACE,
    POD,
    PDB,
    PVC,
)


def key_for(namespace: str | None, name: str) -> str:
    """The one key of an object, in caches and on the work queue: "namespace/name" (or "name")."""
    return f"{namespace}/{name}" if namespace else name


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return key_for(meta.get("namespace"), str(meta.get("name", "")))


def controller_ref(obj: Mapping[str, Any], api_group: str, kind: str) -> Mapping[str, Any] | None:
    """The owner reference with controller=true, if it points at a `kind` of `api_group`."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        group = str(ref.get("apiVersion", "")).rpartition("/")[0]
        if ref.get("controller") and ref.get("kind") == kind and group == api_group:
            return cast(Mapping[str, Any], ref)
    return None


def _segment(value: str) -> str:
    if not value or value in (".", ".."):
        raise ValueError(f"invalid path segment {value!r}")
    return quote(value, safe="")


MAX_RETRY_AFTER = 60.0  # seconds: a longer Retry-After is taken as this


class ApiError(Exception):
    """Any failed request: an HTTP status with the server's Status reason/message, or status 0 for
    a request that got no response (connection refused/reset, timeout)."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None,
                 causes: tuple[str, ...] = ()) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.causes = causes
        """The `type` of each of the Status's details.causes (e.g. "NamespaceTerminating")."""

    def is_not_found(self) -> bool:
        return self.status == 404

    def is_conflict(self) -> bool:
        return self.status == 409

    def is_already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    def is_gone(self) -> bool:
        return self.status == 410

    def is_invalid(self) -> bool:
        return self.status == 422

    def is_forbidden(self) -> bool:
        return self.status == 403

    def is_unauthorized(self) -> bool:
        return self.status == 401

    def is_too_many_requests(self) -> bool:
        return self.status == 429

    def is_transport(self) -> bool:
        return self.status == 0

    def wait_asked(self) -> float:
        """How long the server asked to wait before trying again (a 429's or a 5xx's Retry-After), capped at
        MAX_RETRY_AFTER so that a broken proxy's huge value cannot park a cache or a key; 0 if it did not ask."""
        return min(self.retry_after, MAX_RETRY_AFTER) if self.retry_after else 0.0

    def is_namespace_terminating(self) -> bool:
        """A write into a namespace that is being deleted: refused for good, and the object goes with it."""
        return self.status == 403 and ("NamespaceTerminating" in self.causes or "being terminated" in self.message)

    def is_retryable(self) -> bool:
        """Worth retrying unchanged: throttling, server trouble, or no response at all."""
        return self.status in (0, 429, 500, 502, 503, 504)


class Gone(ApiError):
    """410: the resourceVersion we asked for has been compacted away; the caller must relist."""


def error_from_status(status: int, body: Mapping[str, Any] | None, fallback: str = "") -> ApiError:
    """Build the error for an HTTP status and (if the body was a meta/v1 Status) its details."""
    body = body or {}
    raw_code = body.get("code")
    code = raw_code if isinstance(raw_code, int) else status
    reason = str(body.get("reason") or fallback or "Unknown")
    message = str(body.get("message") or fallback or "")
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    retry_after = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    causes = tuple(str(c.get("reason") or c.get("type") or "") for c in (details or {}).get("causes") or []
                   if isinstance(c, dict))
    # "Expired"/"Gone" are how a too-old resourceVersion is reported, whatever the code says.
    cls = Gone if code == 410 or reason in ("Expired", "Gone") else ApiError
    return cls(int(code), reason, message, float(retry_after) if retry_after else None, causes)


@dataclass(frozen=True)
class ListResult:
    items: list[Obj]
    resource_version: str


@dataclass(frozen=True)
class WatchEvent:
    type: WatchEventType
    object: Obj

    @property
    def resource_version(self) -> str | None:
        rv = self.object.get("metadata", {}).get("resourceVersion")
        return str(rv) if rv else None


def parse_watch_line(line: bytes, resource: Resource, metadata_only: bool) -> WatchEvent | None:
    """One line of a watch stream -> an event; ``Gone`` for an expired resourceVersion."""
    line = line.strip()
    if not line:
        return None
    try:
        raw = orjson.loads(line)  # (the watch streams are most of what the operator parses)
    except ValueError as err:
        raise ApiError(0, "BadWatchEvent", f"not JSON: {line[:200]!r}") from err
    event_type = raw.get("type") if isinstance(raw, dict) else None
    obj = raw.get("object") if isinstance(raw, dict) else None
    if event_type not in _WATCH_EVENT_TYPES or not isinstance(obj, dict):
        raise ApiError(0, "BadWatchEvent", f"unexpected watch event: {line[:200]!r}")
    if event_type == "ERROR":
        error = error_from_status(int(obj.get("code") or 500), obj)
        if isinstance(error, Gone):
            raise error
        return WatchEvent("ERROR", obj)
    if event_type != "BOOKMARK" and metadata_only:
        obj = with_type(obj, resource)
    return WatchEvent(cast(WatchEventType, event_type), obj)


def with_type(obj: Obj, resource: Resource) -> Obj:
    """Stamp apiVersion/kind: list items arrive without them, metadata-only ones as
    PartialObjectMetadata; the cache should hold objects that say what they are."""
    return {**obj, "apiVersion": resource.api_version, "kind": resource.kind}


def _split_lines(buffer: bytearray) -> list[bytes]:
    """Pop every complete line off the front of buffer."""
    lines = []
    start = 0
    while (end := buffer.find(b"\n", start)) >= 0:
        lines.append(bytes(buffer[start:end]))
        start = end + 1
    del buffer[:start]
    return lines


class Place(enum.Enum):
    """Where a request waits for a place in the client's lane of requests in flight."""

    FIRST = 0  # a status write: what a user waits for goes ahead of the children's writes queued before it
    QUEUED = 1  # every other request, in the order sent
    OUTSIDE = 2  # not in the lane (answered by a node's kubelet, not by the API server)


class Lane:
    """At most `size` requests in flight at once (size <= 0: no cap); when all places are taken, a request
    waits in line, `Place.FIRST` ahead of `Place.QUEUED`, each line first come, first served."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._free = size
        self._lines: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    @property
    def waiting(self) -> int:
        return len(self._lines[0]) + len(self._lines[1])

    async def acquire(self, place: Place) -> None:
        if self._size <= 0:
            return
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        line = self._lines[place.value]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a place as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # (release() may have dropped it already)
                    line.remove(waiter)
            raise

    def release(self) -> None:
        if self._size <= 0:
            return
        for line in self._lines:
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the place goes to it: _free stays as it is
                    return
        self._free += 1


UNCAPPED = Lane(0)


class KubeClient:
    """Async dynamic client. One per process; pass it to whatever needs the API.

    ``on_response`` (optional) is told (method, status) for every request, which is what
    controller-runtime's ``rest_client_requests_total{code,method}`` counts.
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        on_response: OnResponse | None = None,
        resources: Iterable[Resource] = DEFAULT_RESOURCES,
        request_timeout: float = 60.0,
        user_agent: str = USER_AGENT,
        qps: float = 0.0,
        burst: int = 1,
        max_in_flight: int = 0,
    ) -> None:
        self._api = api_client
        # Client-side limits, as client-go's: a burst, then `qps` requests a second (a watch counts once).
        # qps <= 0: none (the API server's priority and fairness still apply).
        self._limiter = BucketRateLimiter(qps, burst) if qps > 0 else None
        # Requests in flight at once, watches aside (max_in_flight <= 0: no cap). Over HTTP/1.1 each is a
        # connection of its own, whose TLS state and buffers stay resident until it idles out: without a cap a
        # burst opens one for each worker waiting on the API server. (client-go multiplexes all on one.)
        self.lane = Lane(max_in_flight)
        self._on_response = on_response
        self._by_type = {(r.api_version, r.kind): r for r in resources}
        self._timeout = request_timeout
        self._user_agent = user_agent
        # Leader election sets it (set_write_fence): a write is sent only while it returns True.
        self.write_fence: Callable[[], bool] | None = None
        self._http, self._proxy = _session_over(api_client)

    def set_write_fence(self, fence: Callable[[], bool]) -> None:
        self.write_fence = fence

    def unfenced(self) -> KubeClient:
        """The same client without the write fence: for the Lease itself, which is what opens it. Nor does it
        queue for the requests' lane: a renewal must not wait behind a burst of reconciles."""
        twin = copy.copy(self)
        twin.write_fence = None
        twin.lane = UNCAPPED
        return twin

    def resource_for(self, obj: Mapping[str, Any]) -> Resource:
        key = (obj.get("apiVersion"), obj.get("kind"))
        try:
            return self._by_type[cast(tuple[str, str], key)]
        except KeyError:
            raise ValueError(f"no Resource known for apiVersion/kind {key}") from None

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        obj = await self._json("GET", resource.path(namespace, name))
        return with_type(obj, resource)

    async def log_tail(self, namespace: str, pod: str, container: str, lines: int, limit_bytes: int,
                       seconds: float) -> str:
        """The last `lines` lines (at most `limit_bytes` bytes) of a container's log (pods/log, get), within
        `seconds` (not the client's usual timeout: the API server asks the node's kubelet)."""
        query = _query(container=container, tailLines=lines, limitBytes=limit_bytes)
        # The log is plain text, yet the API server negotiates this route as for objects: text/plain is
        # refused (406 Not Acceptable); kubectl asks for anything too.
        # Outside the lane: the kubelet answers it, and a slow node must not hold up the reconciles' requests
        # (there is one read every few seconds for each pulling ModelAPI at most).
        _, data = await self._exchange("GET", POD.path(namespace, pod, "log"), query, "*/*", None,
                                       aiohttp.ClientTimeout(total=seconds), place=Place.OUTSIDE)
        return data[:limit_bytes].decode("utf-8", "replace")  # (the server cuts at limitBytes already)

    async def check_list(self, resource: Resource, namespace: str | None, label_selector: str | None = None,
                         metadata_only: bool = False) -> None:
        """One page of one object: raises the ApiError a list would (RBAC, a missing API) without reading all."""
        accept = PARTIAL_METADATA_LIST if metadata_only else JSON
        await self._json("GET", resource.path(namespace), query=_query(labelSelector=label_selector, limit=1),
                         accept=accept)

    async def serves(self, resource: Resource) -> bool:
        """Whether the cluster serves `resource` (one discovery request; e.g. is a CRD installed)."""
        prefix = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
        try:
            found = await self._json("GET", prefix)
        except ApiError as e:
            if e.is_not_found():
                return False
            raise
        return any(r.get("name") == resource.plural for r in found.get("resources") or [])

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = 500,
    ) -> ListResult:
        """A consistent list of everything (paged; falls back to one unpaged list if a continue
        token expires mid-way, like client-go's pager)."""
        try:
            return await self._list_paged(resource, namespace, label_selector, metadata_only, page_size)
        except Gone:
            return await self._list_paged(resource, namespace, label_selector, metadata_only, 0)

    async def _list_paged(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str | None,
        metadata_only: bool,
        page_size: int,
    ) -> ListResult:
        accept = PARTIAL_METADATA_LIST if metadata_only else JSON
        items: list[Obj] = []
        token = ""
        while True:
            query = _query(labelSelector=label_selector, limit=page_size or None)
            if token:
                query.append(("continue", token))
            page = await self._json("GET", resource.path(namespace), query=query, accept=accept)
            items.extend(with_type(item, resource) for item in page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return ListResult(items, str(meta.get("resourceVersion") or ""))

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        resource_version: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        timeout_seconds: int | None = None,
        initial_events: bool = False,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Raw watch stream with bookmarks. Ends when the server closes it (timeout_seconds);
        raises ``Gone`` when resource_version is too old and ``ApiError`` on anything else.
        Use it inside ``contextlib.aclosing`` so an abandoned stream closes its connection.

        With ``initial_events`` (a streaming list, KEP-3157): every existing object first, as ADDED, then
        a BOOKMARK annotated ``k8s.io/initial-events-end``, then the changes, as any watch."""
        query = _query(
            watch="true",
            allowWatchBookmarks="true",
            resourceVersion=resource_version,
            labelSelector=label_selector,
            timeoutSeconds=timeout_seconds,
            sendInitialEvents="true" if initial_events else None,
            resourceVersionMatch="NotOlderThan" if initial_events else None,
        )
        accept = accept_for(metadata_only)
        # The server ends the stream after timeout_seconds; one still open well after that is on a dead
        # connection, and is closed rather than left to hang. One deadline for the whole stream, not a read
        # timeout: aiohttp moves a read timeout's timer at every chunk received (2 % of a cold converge's CPU).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds + WATCH_DEADLINE_GRACE if timeout_seconds else None
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout)
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._send("GET", resource.path(namespace), query, accept, None, timeout)
        except TimeoutError as err:
            raise _watch_expired(resource) from err
        expired = loop.call_at(deadline, response.close) if deadline is not None else None
        try:
            if response.status != 200:
                raise await self._error_from_response(response)
            buffer = bytearray()
            async for chunk in self._chunks(response):
                buffer.extend(chunk)
                for line in _split_lines(buffer):
                    event = parse_watch_line(line, resource, metadata_only)
                    if event is not None:
                        yield event
        except ApiError as err:
            if deadline is not None and loop.time() >= deadline:
                raise _watch_expired(resource) from err
            raise
        finally:
            if expired is not None:
                expired.cancel()
            # A half-read stream cannot go back to the pool.
            response.close()

    # -- writes ---------------------------------------------------------------------------------

    # The reconciler never reads what a write answers: ``metadata_only`` asks for the object's metadata alone
    # (PartialObjectMetadata, stamped with its kind), which spares the API server encoding a Deployment's spec
    # and status and this process reading and decoding them, for every write.

    async def apply(self, obj: Mapping[str, Any], field_manager: str, force: bool = False, *,
                    metadata_only: bool = False) -> Obj:
        """Server-side apply: ``obj`` is our whole intent for the fields we manage."""
        return await self._apply(obj, field_manager, force, None, metadata_only)

    async def apply_status(self, obj: Mapping[str, Any], field_manager: str, force: bool = False, *,
                           metadata_only: bool = False) -> Obj:
        """Server-side apply on the status subresource (``obj`` carries identity + ``status``)."""
        return await self._apply(obj, field_manager, force, "status", metadata_only)

    async def _apply(self, obj: Mapping[str, Any], field_manager: str, force: bool, subresource: str | None,
                     metadata_only: bool) -> Obj:
        resource = self.resource_for(obj)
        namespace, name = _identity(obj, resource)
        query = _query(fieldManager=field_manager, force="true" if force else None)
        result = await self._json("PATCH", resource.path(namespace, name, subresource), query=query,
                                  body=dict(obj), content_type=APPLY_PATCH, accept=accept_for(metadata_only),
                                  place=Place.FIRST if subresource == "status" else Place.QUEUED)
        return with_type(result, resource)

    async def create(self, obj: Mapping[str, Any], field_manager: str | None = None, *,
                     metadata_only: bool = False) -> Obj:
        resource = self.resource_for(obj)
        namespace = obj.get("metadata", {}).get("namespace") if resource.namespaced else None
        if resource.namespaced and not namespace:
            raise ValueError(f"{resource.kind} needs metadata.namespace")
        query = _query(fieldManager=field_manager)
        result = await self._json("POST", resource.path(namespace), query=query, body=dict(obj),
                                  accept=accept_for(metadata_only))
        return with_type(result, resource)

    async def replace(self, obj: Mapping[str, Any], field_manager: str, *, metadata_only: bool = False) -> Obj:
        """PUT the whole object (optimistic: ``metadata.resourceVersion`` must be current)."""
        resource = self.resource_for(obj)
        namespace, name = _identity(obj, resource)
        query = _query(fieldManager=field_manager)
        result = await self._json("PUT", resource.path(namespace, name), query=query, body=dict(obj),
                                  accept=accept_for(metadata_only))
        return with_type(result, resource)

    async def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        uid: str | None,
        propagation_policy: str | None = "Background",
    ) -> bool:
        """Delete one object, only if it still has ``uid`` (so a same-named replacement survives).

        True if the server accepted the deletion; False if the object was already gone (404) or
        is a different object now (the UID precondition failed)."""
        options: Obj = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        if propagation_policy is not None:
            options["propagationPolicy"] = propagation_policy
        try:
            await self._json("DELETE", resource.path(namespace, name), body=options)
        except ApiError as err:
            if err.is_not_found() or (uid is not None and _is_uid_precondition_failure(err)):
                return False
            raise
        return True

    # -- transport ------------------------------------------------------------------------------

    async def _json(
        self,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        body: Obj | None = None,
        accept: str = JSON,
        content_type: str = JSON,
        place: Place = Place.QUEUED,
    ) -> Obj:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        code, data = await self._exchange(method, path, query or [], accept, (body, content_type), timeout,
                                          place=place)
        try:
            decoded = orjson.loads(data) if data else {}
        except ValueError as err:
            raise ApiError(code, "BadResponse", f"not JSON: {data[:200]!r}") from err
        if not isinstance(decoded, dict):
            raise ApiError(code, "BadResponse", f"not a JSON object: {data[:200]!r}")
        return decoded

    async def _exchange(
        self,
        method: str,
        path: str,
        query: Query,
        accept: str,
        payload: tuple[Obj | None, str] | None,
        client_timeout: aiohttp.ClientTimeout,
        *,
        place: Place = Place.QUEUED,
    ) -> tuple[int, bytes]:
        """A request and its whole answer (status code, body), in the lane from the sending until the connection
        is free again. The timeout runs from the sending: a wait for the lane is not in it."""
        lane = self.lane if place is not Place.OUTSIDE else UNCAPPED
        await lane.acquire(place)
        try:
            response = await self._send(method, path, query, accept, payload, client_timeout)
            try:
                if not 200 <= response.status < 300:
                    raise await self._error_from_response(response)
                try:
                    return response.status, await response.read()
                except (aiohttp.ClientError, TimeoutError) as err:
                    raise ApiError(0, type(err).__name__, str(err) or repr(err)) from err
            finally:
                response.release()
        finally:
            lane.release()

    async def _send(
        self,
        method: str,
        path: str,
        query: Query,
        accept: str,
        payload: tuple[Obj | None, str] | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        if self._limiter is not None and (delay := self._limiter.when(None)) > 0:
            await asyncio.sleep(delay)
        body, content_type = payload if payload is not None else (None, JSON)
        # Identity: aiohttp asks for gzip by default, and the API server then compresses every answer over
        # 128 KiB and the initial events of a streaming list (WatchListCompression): CPU on both ends, each
        # time, to save bytes a cluster's network does not need saved (a restart's caches with 1000 ModelAPIs
        # listed 0.1 s sooner without).
        headers = {"Accept": accept, "Accept-Encoding": "identity", "Content-Type": content_type,
                   "User-Agent": self._user_agent}
        # Adds (and, for in-cluster/exec credentials, refreshes) the bearer token.
        await self._api.update_params_for_auth(headers, query, ["BearerToken"])
        # Encoded here, once, as the library's REST client did (urlencode): aiohttp is told not to again.
        url = f"{self._api.configuration.host}{path}"
        if query:
            url = f"{url}?{urlencode(query)}"
        # Checked last, after every wait: a process frozen (SIGSTOP, a long GC pause) past its Lease
        # finds the fence closed when it wakes, and sends nothing another leader may have decided since.
        fence = self.write_fence if method in WRITE_METHODS else None
        if fence is not None and not fence():
            raise _not_leader(f"{method} {path}")
        data = b"" if body is None else orjson.dumps(body)
        try:
            response = await self._http.request(
                method,
                yarl.URL(url, encoded=True),
                headers=headers,
                data=(None if body is None else data) if fence is None else _FencedBody(data, fence),
                timeout=client_timeout,
                **self._proxy,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            self._count(method, 0)
            if fence is not None and not fence():
                raise _not_leader(f"{method} {path}") from err
            raise ApiError(0, type(err).__name__, str(err) or repr(err)) from err
        self._count(method, response.status)
        return response

    @staticmethod
    async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise ApiError(0, type(err).__name__, str(err) or repr(err)) from err

    @staticmethod
    async def _error_from_response(response: aiohttp.ClientResponse) -> ApiError:
        try:
            data = await response.read()
            body = json.loads(data) if data else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            body = None
        error = error_from_status(response.status, body if isinstance(body, dict) else None, response.reason or "")
        if error.retry_after is None and (header := response.headers.get("Retry-After", "")).isdigit():
            error.retry_after = float(header)
        return error

    def _count(self, method: str, code: int) -> None:
        if self._on_response is not None:
            self._on_response(method, code)


def _session_over(api_client: ApiClient) -> tuple[aiohttp.ClientSession, dict[str, Any]]:
    """A session over the library's own connection pool (its TLS context and client certificates), for our
    requests, and the per-request options the library would add (a proxy, the TLS server name).

    Not the library's session: that one trusts the environment, which costs every request a netrc lookup
    and a proxy lookup, each on a thread (a third of the operator's CPU on a cold converge). The proxy from
    the environment (HTTPS_PROXY, NO_PROXY) is looked up once here instead, as client-go does per client."""
    configuration = api_client.configuration
    pool: aiohttp.ClientSession = api_client.rest_client.pool_manager
    session = aiohttp.ClientSession(connector=pool.connector, connector_owner=False, trust_env=False,
                                    read_bufsize=2**21)  # as the library's: a watch event can be large
    options: dict[str, Any] = {}
    if proxy := configuration.proxy or _env_proxy(str(configuration.host)):
        options["proxy"] = proxy
        if configuration.proxy_headers:
            options["proxy_headers"] = configuration.proxy_headers
    if configuration.tls_server_name:
        options["server_hostname"] = configuration.tls_server_name
    return session, options


def _env_proxy(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _watch_expired(resource: Resource) -> ApiError:
    return ApiError(0, "WatchExpired", f"the watch of {resource.plural} outlived its timeoutSeconds by "
                    f"{WATCH_DEADLINE_GRACE:g} s: its connection is taken for dead")


def accept_for(metadata_only: bool) -> str:
    """The Accept header of a request whose answer is read whole, or only as its metadata."""
    return PARTIAL_METADATA if metadata_only else JSON


def _query(**params: str | int | None) -> Query:
    return [(key, str(value)) for key, value in params.items() if value is not None]


def _identity(obj: Mapping[str, Any], resource: Resource) -> tuple[str | None, str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ValueError(f"{resource.kind} needs metadata.name")
    namespace = meta.get("namespace") if resource.namespaced else None
    if resource.namespaced and not namespace:
        raise ValueError(f"{resource.kind} {name} needs metadata.namespace")
    return namespace, str(name)


class TerminatingNamespaces:
    """Namespaces being deleted, and since when: their older objects go with them, so a write about any of them
    would only be refused (403 NamespaceTerminating). Known from the Namespace cache when there is one (its
    deletionTimestamp, seen before the namespace controller deletes the first object in it, so no write is
    refused), else from the API server's first refusal (one per namespace, not one per object). A namespace of
    the same name made later is a new one, and so are the objects in it."""

    def __init__(self, namespaces: Callable[[str], Mapping[str, Any] | None] | None = None) -> None:
        self._since: dict[str, str] = {}
        self._namespaces = namespaces  # name -> the cached Namespace, if the operator may watch them

    def mark(self, namespace: str, now: str) -> None:
        self._since[namespace] = now

    def since(self, namespace: str) -> str | None:
        since = self._since.get(namespace)
        if since is None and self._namespaces is not None and (ns := self._namespaces(namespace)) is not None:
            since = (ns.get("metadata") or {}).get("deletionTimestamp")
        return since

    def holds(self, obj: Mapping[str, Any]) -> bool:
        meta = obj["metadata"]
        since = self.since(meta.get("namespace", ""))
        return since is not None and meta.get("creationTimestamp", "") <= since


def _is_uid_precondition_failure(err: ApiError) -> bool:
    return err.is_conflict() and "precondition" in err.message.lower() and "uid" in err.message.lower()


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


class ConfigError(Exception):
    """No usable credentials: the kubeconfig is missing or unreadable, or in-cluster config is incomplete."""


async def load_api_client(kubeconfig: str | None) -> ApiClient:
    """An ApiClient from the given kubeconfig file; else in-cluster credentials when running in a
    pod; else the default kubeconfig ($KUBECONFIG or ~/.kube/config), as kubectl would."""
    configuration = Configuration()
    where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    hint = "(pass --kubeconfig FILE, set KUBECONFIG, or run in a pod with a ServiceAccount)"
    try:
        if kubeconfig is not None and not _is_file(kubeconfig):  # the library would only log it, then fail oddly
            raise ConfigError(f"cannot load the kubeconfig {kubeconfig}: no such file {hint}")
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            # untyped upstream; it fills `configuration` and installs a token-file refresh hook
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await kube_config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
    except ConfigError:
        raise
    except Exception as e:  # the library raises several kinds (ConfigException, OSError, YAML errors, ...)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"cannot load the kubeconfig {where}: {reason} {hint}") from None
    client = ApiClient(configuration=configuration)
    client.user_agent = USER_AGENT
    return client
