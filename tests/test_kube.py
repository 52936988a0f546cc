"""KubeClient's wire behaviour (paths, headers, content types, errors, streaming) against a tiny
local HTTP server that plays the API server; the real one is exercised in e2e/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration
from multidict import CIMultiDict

from kaos_modelapi import __version__, kube
from kaos_modelapi.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    MODELAPI,
    NAMESPACE,
    SECRET,
    ApiError,
    Gone,
    KubeClient,
    Lane,
    Place,
    Resource,
    WatchEvent,
    load_api_client,
    parse_watch_line,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeApiServer:
    routes: list[Handler] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # ends the stalled answers (`stall`)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path, dict(request.query), CIMultiDict(request.headers), await request.read())
        )
        return await self.routes.pop(0)(request)

    def reply(self, status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> None:
        async def respond(_: web.Request) -> web.Response:
            text = body if isinstance(body, str) else json.dumps(body if body is not None else {})
            return web.Response(status=status, text=text, headers=headers, content_type="application/json")

        self.routes.append(respond)

    def stream(self, chunks: list[bytes], status: int = 200) -> None:
        async def respond(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
            return response

        self.routes.append(respond)

    def stall(self, chunks: list[bytes], headers: bool = True) -> None:
        """Send these chunks (or not even the headers), then nothing, the connection left open: a dead peer."""

        async def respond(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            if headers:
                await response.prepare(request)
                for chunk in chunks:
                    await response.write(chunk)
            await self.released.wait()
            return response

        self.routes.append(respond)


def status_body(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    body |= {"reason": reason, "message": message}
    if details:
        body["details"] = details
    return body


@dataclass
class Env:
    server: FakeApiServer
    client: KubeClient
    responses: list[tuple[str, int]]
    port: int = 0

    @property
    def last(self) -> Seen:
        return self.server.seen[-1]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    configuration = Configuration(host=f"http://127.0.0.1:{port}")
    configuration.api_key = {"BearerToken": "t0ken"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    api_client = ApiClient(configuration=configuration)
    responses: list[tuple[str, int]] = []
    client = KubeClient(api_client, on_response=lambda m, c: responses.append((m, c)))
    try:
        yield Env(fake, client, responses, port)
    finally:
        fake.released.set()
        await api_client.close()
        await runner.cleanup()


def cm(name: str = "x", **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ns"}, **extra}


# -- paths --------------------------------------------------------------------------------------------


def test_a_client_can_be_made_while_no_event_loop_runs() -> None:
    """As a sync fixture makes one, over an ApiClient made in the loop (e2e/test_informer.py)."""

    async def api_client() -> ApiClient:
        return ApiClient(configuration=Configuration(host="http://127.0.0.1:1"))

    loop = asyncio.new_event_loop()
    try:
        made = loop.run_until_complete(api_client())
        client = KubeClient(made)
        assert client.resource_for(cm()) == CONFIGMAP
        loop.run_until_complete(made.close())
    finally:
        loop.close()


def test_resource_paths() -> None:
    assert CONFIGMAP.path("ns", "x") == "/api/v1/namespaces/ns/configmaps/x"
    assert CONFIGMAP.path() == "/api/v1/configmaps"
    assert DEPLOYMENT.path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert MODELAPI.path("ns", "m", "status") == "/apis/kaos.tools/v1alpha1/namespaces/ns/modelapis/m/status"
    assert NAMESPACE.path(name="ns") == "/api/v1/namespaces/ns"
    assert MODELAPI.api_version == "kaos.tools/v1alpha1" and SECRET.api_version == "v1"
    with pytest.raises(ValueError):
        NAMESPACE.path("ns")
    with pytest.raises(ValueError):
        CONFIGMAP.path("ns", subresource="status")
    with pytest.raises(ValueError):
        CONFIGMAP.path("ns", "..")
    assert CONFIGMAP.path("ns", "a/b") == "/api/v1/namespaces/ns/configmaps/a%2Fb"


# -- requests -----------------------------------------------------------------------------------------


async def test_get_sends_our_user_agent_token_and_accept_and_asks_for_no_compression(env: Env) -> None:
    env.server.reply(body={"metadata": {"name": "x"}, "data": {}})
    got = await env.client.get(CONFIGMAP, "ns", "x")
    assert got["kind"] == "ConfigMap" and got["apiVersion"] == "v1"
    seen = env.last
    assert (seen.method, seen.path) == ("GET", "/api/v1/namespaces/ns/configmaps/x")
    assert seen.headers["User-Agent"] == f"kaos-modelapi/{__version__}"
    assert seen.headers["Accept"] == "application/json"
    assert seen.headers["authorization"] == "Bearer t0ken"
    assert seen.headers["Accept-Encoding"] == "identity"
    assert env.responses == [("GET", 200)]


async def test_a_netrc_entry_for_the_api_server_changes_nothing(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials come from the kubeconfig only (as with kubectl): a netrc entry is not read."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    env.server.reply(body={"metadata": {"name": "x"}})
    await env.client.get(CONFIGMAP, "ns", "x")
    assert env.last.headers["authorization"] == "Bearer t0ken"


async def test_query_values_arrive_as_sent(env: Env) -> None:
    env.server.reply(body={"metadata": {"continue": "a+b/c==", "resourceVersion": "1"}, "items": []})
    env.server.reply(body={"metadata": {"resourceVersion": "2"}, "items": []})
    await env.client.list(CONFIGMAP, "ns", label_selector="app in (x, y),!z")
    assert env.server.seen[0].query["labelSelector"] == "app in (x, y),!z"
    assert env.server.seen[1].query["continue"] == "a+b/c=="


async def test_requests_go_through_the_proxy_of_the_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY and NO_PROXY are honoured, as client-go does (read once, when the client is made)."""
    proxy = f"http://127.0.0.1:{env.port}"
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    api_client = ApiClient(configuration=Configuration(host="http://kube-api.invalid:6443"))
    try:
        client = KubeClient(api_client)
        env.server.reply(body={"metadata": {"name": "x"}})
        await client.get(CONFIGMAP, "ns", "x")  # kube-api.invalid resolves nowhere: only the proxy answers
        assert env.last.path == "/api/v1/namespaces/ns/configmaps/x"
        assert env.last.headers["Host"] == "kube-api.invalid:6443"
        monkeypatch.setenv("NO_PROXY", "kube-api.invalid")
        with pytest.raises(ApiError) as err:
            await KubeClient(api_client).get(CONFIGMAP, "ns", "x")
        assert err.value.is_transport()
    finally:
        await api_client.close()


async def test_list_follows_continue_tokens_and_stamps_types(env: Env) -> None:
    env.server.reply(
        body={"metadata": {"continue": "c1", "resourceVersion": "7"}, "items": [{"metadata": {"name": "a"}}]}
    )
    env.server.reply(body={"metadata": {"resourceVersion": "8"}, "items": [{"metadata": {"name": "b"}}]})
    result = await env.client.list(CONFIGMAP, "ns", label_selector="app=x")
    assert [i["metadata"]["name"] for i in result.items] == ["a", "b"]
    assert all(i["kind"] == "ConfigMap" for i in result.items)
    assert result.resource_version == "8"
    first, second = env.server.seen
    assert first.query == {"labelSelector": "app=x", "limit": "500"}
    assert second.query == {"labelSelector": "app=x", "limit": "500", "continue": "c1"}


async def test_list_falls_back_to_one_unpaged_list_when_the_continue_token_expires(env: Env) -> None:
    env.server.reply(body={"metadata": {"continue": "c1"}, "items": [{"metadata": {"name": "a"}}]})
    env.server.reply(410, status_body(410, "Expired", "continue token expired"))
    env.server.reply(body={"metadata": {"resourceVersion": "9"}, "items": [{"metadata": {"name": "a"}}]})
    result = await env.client.list(CONFIGMAP, "ns")
    assert [i["metadata"]["name"] for i in result.items] == ["a"]
    assert env.last.query == {}


async def test_metadata_only_list_asks_for_partial_object_metadata(env: Env) -> None:
    env.server.reply(
        body={
            "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "3"},
            "items": [{"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": {"name": "s"}}],
        }
    )
    result = await env.client.list(SECRET, "ns", metadata_only=True)
    assert env.last.headers["Accept"] == "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
    assert (result.items[0]["apiVersion"], result.items[0]["kind"]) == ("v1", "Secret")


async def test_apply_is_an_apply_patch_with_field_manager_and_force_only_when_asked(env: Env) -> None:
    env.server.reply(body=cm())
    env.server.reply(body=cm())
    await env.client.apply(cm(data={"k": "v"}), "kaos")
    await env.client.apply(cm(), "kaos", force=True)
    plain, forced = env.server.seen
    assert (plain.method, plain.path) == ("PATCH", "/api/v1/namespaces/ns/configmaps/x")
    assert plain.headers["Content-Type"] == "application/apply-patch+yaml"
    assert plain.query == {"fieldManager": "kaos"}
    assert yaml.safe_load(plain.body) == cm(data={"k": "v"})
    assert forced.query == {"fieldManager": "kaos", "force": "true"}


async def test_apply_status_targets_the_status_subresource(env: Env) -> None:
    env.server.reply(body={"apiVersion": MODELAPI.api_version, "kind": "ModelAPI", "metadata": {"name": "m"}})
    obj = {"apiVersion": "kaos.tools/v1alpha1", "kind": "ModelAPI", "metadata": {"name": "m", "namespace": "ns"}}
    await env.client.apply_status({**obj, "status": {"phase": "Ready"}}, "kaos")
    assert env.last.path == "/apis/kaos.tools/v1alpha1/namespaces/ns/modelapis/m/status"
    assert env.last.headers["Content-Type"] == "application/apply-patch+yaml"


async def test_writes_asked_for_metadata_only_ask_for_partial_object_metadata(env: Env) -> None:
    partial = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "x"}}
    for _ in range(4):
        env.server.reply(body=partial)
    answers = [await env.client.apply(cm(), "kaos", metadata_only=True),
               await env.client.apply_status(cm(), "kaos", metadata_only=True),
               await env.client.create(cm(), "kaos", metadata_only=True),
               await env.client.replace(cm(), "kaos", metadata_only=True)]
    assert {r.headers["Accept"] for r in env.server.seen} == {
        "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}
    assert all((a["apiVersion"], a["kind"]) == ("v1", "ConfigMap") for a in answers)
    env.server.reply(body=cm())
    await env.client.apply(cm(), "kaos")  # by default, the whole object
    assert env.last.headers["Accept"] == "application/json"


async def test_apply_refuses_unknown_kinds_and_missing_identity(env: Env) -> None:
    with pytest.raises(ValueError):
        await env.client.apply({"apiVersion": "x/v1", "kind": "Nope", "metadata": {"name": "n"}}, "kaos")
    with pytest.raises(ValueError):
        await env.client.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "n"}}, "kaos")
    assert env.server.seen == []


async def test_create_posts_to_the_collection(env: Env) -> None:
    env.server.reply(201, cm())
    await env.client.create(cm(), field_manager="kaos")
    assert (env.last.method, env.last.path, env.last.query) == (
        "POST",
        "/api/v1/namespaces/ns/configmaps",
        {"fieldManager": "kaos"},
    )
    assert env.responses == [("POST", 201)]


async def test_delete_sends_a_uid_precondition(env: Env) -> None:
    env.server.reply(body={"kind": "Status", "status": "Success"})
    assert await env.client.delete(CONFIGMAP, "ns", "x", "u-1")
    assert env.last.method == "DELETE"
    assert json.loads(env.last.body) == {
        "apiVersion": "v1",
        "kind": "DeleteOptions",
        "preconditions": {"uid": "u-1"},
        "propagationPolicy": "Background",
    }


async def test_delete_of_a_missing_or_replaced_object_is_not_an_error(env: Env) -> None:
    env.server.reply(404, status_body(404, "NotFound", 'configmaps "x" not found'))
    assert not await env.client.delete(CONFIGMAP, "ns", "x", "u-1")
    env.server.reply(
        409,
        status_body(409, "Conflict", "Precondition failed: UID in precondition: u-1, UID in object meta: u-2"),
    )
    assert not await env.client.delete(CONFIGMAP, "ns", "x", "u-1")
    env.server.reply(409, status_body(409, "Conflict", "something else"))
    with pytest.raises(ApiError):
        await env.client.delete(CONFIGMAP, "ns", "x", "u-1")


async def test_errors_carry_the_status_reason_and_message(env: Env) -> None:
    env.server.reply(404, status_body(404, "NotFound", 'configmaps "x" not found'))
    with pytest.raises(ApiError) as nf:
        await env.client.get(CONFIGMAP, "ns", "x")
    assert nf.value.is_not_found() and nf.value.reason == "NotFound" and "not found" in nf.value.message
    env.server.reply(502, "<html>bad gateway</html>")
    with pytest.raises(ApiError) as bad:
        await env.client.get(CONFIGMAP, "ns", "x")
    assert bad.value.status == 502 and bad.value.is_retryable()
    env.server.reply(429, status_body(429, "TooManyRequests", "slow down", retryAfterSeconds=3))
    with pytest.raises(ApiError) as slow:
        await env.client.get(CONFIGMAP, "ns", "x")
    assert slow.value.is_too_many_requests() and slow.value.retry_after == 3
    env.server.reply(429, "{}", headers={"Retry-After": "5"})
    with pytest.raises(ApiError) as header:
        await env.client.get(CONFIGMAP, "ns", "x")
    assert header.value.retry_after == 5
    env.server.reply(409, status_body(409, "AlreadyExists", "exists"))
    with pytest.raises(ApiError) as exists:
        await env.client.create(cm())
    assert exists.value.is_already_exists() and exists.value.is_conflict()
    assert [code for _, code in env.responses] == [404, 502, 429, 429, 409]


async def test_no_server_is_an_api_error_with_status_zero() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    responses: list[tuple[str, int]] = []
    api_client = ApiClient(configuration=Configuration(host=f"http://127.0.0.1:{port}"))
    try:
        client = KubeClient(api_client, on_response=lambda m, c: responses.append((m, c)))
        with pytest.raises(ApiError) as err:
            await client.get(CONFIGMAP, "ns", "x")
        assert err.value.is_transport() and err.value.is_retryable()
        assert responses == [("GET", 0)]
    finally:
        await api_client.close()


# -- watch ---------------------------------------------------------------------------------------------


def line(event_type: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


async def collect(stream: AsyncIterator[WatchEvent]) -> list[WatchEvent]:
    return [event async for event in stream]


async def test_watch_streams_typed_events_split_across_chunks(env: Env) -> None:
    added = line("ADDED", cm("a") | {"metadata": {"name": "a", "resourceVersion": "5"}})
    bookmark = line("BOOKMARK", {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}})
    error = line("ERROR", status_body(500, "InternalError", "hiccup"))
    payload = added + b"\n" + bookmark + error
    env.server.stream([payload[:7], payload[7:60], payload[60:]])
    events = await collect(env.client.watch(CONFIGMAP, "ns", resource_version="4", timeout_seconds=30))
    assert [e.type for e in events] == ["ADDED", "BOOKMARK", "ERROR"]
    assert [e.resource_version for e in events[:2]] == ["5", "9"]
    assert env.last.query == {
        "watch": "true",
        "allowWatchBookmarks": "true",
        "resourceVersion": "4",
        "timeoutSeconds": "30",
    }
    assert env.last.headers["Accept-Encoding"] == "identity"  # (a streaming list's initial events: not gzipped)
    assert env.responses == [("GET", 200)]


@pytest.mark.parametrize("headers", [True, False], ids=["silent-after-an-event", "no-answer"])
async def test_a_watch_on_a_dead_connection_ends_with_an_error_once_well_past_its_timeout(
    env: Env, monkeypatch: pytest.MonkeyPatch, headers: bool
) -> None:
    monkeypatch.setattr(kube, "WATCH_DEADLINE_GRACE", 0.3)
    env.server.stall([line("ADDED", cm("a"))], headers=headers)
    seen: list[WatchEvent] = []
    with pytest.raises(ApiError) as raised:
        async for event in env.client.watch(CONFIGMAP, "ns", resource_version="1", timeout_seconds=1):
            seen.append(event)
    assert raised.value.reason == "WatchExpired" and "configmaps" in raised.value.message
    assert [e.type for e in seen] == (["ADDED"] if headers else [])


async def test_watch_error_410_is_gone(env: Env) -> None:
    env.server.stream([line("ADDED", cm("a")), line("ERROR", status_body(410, "Expired", "too old resource version"))])
    seen: list[WatchEvent] = []
    with pytest.raises(Gone):
        async for event in env.client.watch(CONFIGMAP, "ns", resource_version="1"):
            seen.append(event)
    assert [e.type for e in seen] == ["ADDED"]


async def test_watch_refused_with_an_http_status_raises(env: Env) -> None:
    env.server.reply(410, status_body(410, "Gone", "too old"))
    with pytest.raises(Gone):
        await collect(env.client.watch(CONFIGMAP, "ns", resource_version="1"))
    env.server.reply(403, status_body(403, "Forbidden", "no"))
    with pytest.raises(ApiError) as forbidden:
        await collect(env.client.watch(CONFIGMAP, "ns"))
    assert forbidden.value.is_forbidden()


async def test_metadata_only_watch_asks_for_partial_metadata_and_stamps_the_kind(env: Env) -> None:
    partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": {"name": "s"}}
    env.server.stream([line("MODIFIED", partial)])
    (event,) = await collect(env.client.watch(SECRET, "ns", metadata_only=True))
    assert env.last.headers["Accept"] == "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    assert (event.object["kind"], event.object["apiVersion"]) == ("Secret", "v1")


async def test_abandoning_a_watch_closes_it(env: Env) -> None:
    release = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(line("ADDED", cm("a")))
        await release.wait()
        return response

    env.server.routes.append(endless)
    async with contextlib.aclosing(env.client.watch(CONFIGMAP, "ns")) as events:
        async for event in events:
            assert event.type == "ADDED"
            break
    release.set()
    # A new request works: the abandoned stream did not poison the pool.
    env.server.reply(body=cm())
    await env.client.get(CONFIGMAP, "ns", "x")


def test_parse_watch_line_rejects_garbage() -> None:
    assert parse_watch_line(b"  \n", CONFIGMAP, False) is None
    with pytest.raises(ApiError):
        parse_watch_line(b'{"type": "WHAT", "object": {}}', CONFIGMAP, False)
    with pytest.raises(ApiError):
        parse_watch_line(b'{"type": "ADDED", "obj', CONFIGMAP, False)
    with pytest.raises(ApiError):
        parse_watch_line(b"[1]", CONFIGMAP, False)


def test_resource_equality_is_by_value() -> None:
    assert Resource("", "v1", "configmaps", "ConfigMap") == CONFIGMAP
    assert len({CONFIGMAP, Resource("", "v1", "configmaps", "ConfigMap")}) == 1


# -- config ---------------------------------------------------------------------------------------------


async def test_load_api_client_from_a_kubeconfig_file(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "abc"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api_client = await load_api_client(str(kubeconfig))
    try:
        assert api_client.configuration.host == "https://127.0.0.1:6443"
        assert api_client.user_agent == f"kaos-modelapi/{__version__}"
        assert "abc" in api_client.configuration.api_key["BearerToken"]
    finally:
        await api_client.close()


async def test_a_closed_write_fence_sends_no_write_but_reads_go_on(env: Env) -> None:
    open_ = [True]
    env.client.write_fence = lambda: open_[0]
    env.server.reply(201, cm())
    await env.client.create(cm(), field_manager="kaos")
    open_[0] = False
    with pytest.raises(ApiError) as refused:
        await env.client.create(cm(), field_manager="kaos")
    assert refused.value.reason == "NotLeader"
    assert len(env.server.seen) == 1  # the refused write never left the process
    env.server.reply(200, cm())
    await env.client.get(CONFIGMAP, "ns", "x")
    env.server.reply(201, cm())
    await env.client.unfenced().create(cm(), field_manager="kaos")  # the Lease's own client
    assert [s.method for s in env.server.seen] == ["POST", "GET", "POST"]


async def test_a_fence_that_closes_before_the_writes_bytes_leave_still_stops_it(env: Env) -> None:
    checks: list[bool] = []

    def fence() -> bool:  # open when the write is decided, closed by the time its bytes would leave
        checks.append(not checks)
        return checks[-1]

    env.client.set_write_fence(fence)
    with pytest.raises(ApiError) as refused:
        await env.client.create(cm(), field_manager="kaos")
    assert refused.value.reason == "NotLeader"
    assert env.server.seen == []
    env.server.reply(200, cm())
    await env.client.get(CONFIGMAP, "ns", "x")  # reads pass: the fence is for writes only
    assert [s.method for s in env.server.seen] == ["GET"]


async def test_requests_in_flight_are_capped_but_watches_the_lease_and_logs_are_not(env: Env) -> None:
    """A burst of workers shares `max_in_flight` connections; the watches, the Lease's renewals and the pods' log
    reads (which the kubelet answers) never queue."""
    client = KubeClient(env.client._api, max_in_flight=2)
    release = asyncio.Event()
    in_flight: list[int] = [0, 0]  # now, most at once

    async def held(request: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await release.wait()
        in_flight[0] -= 1
        return web.json_response(cm())

    async def until(count: int) -> None:
        while len(env.server.seen) < count:
            await asyncio.sleep(0.01)

    env.server.routes.extend([held] * 5)
    reads = [asyncio.create_task(client.get(CONFIGMAP, "ns", "x")) for _ in range(5)]
    await asyncio.wait_for(until(2), timeout=5)
    env.server.stream([line("ADDED", cm("w"))])
    env.server.routes.insert(0, env.server.routes.pop())  # (answered next: the three other reads still wait)
    events = await asyncio.wait_for(collect(client.watch(CONFIGMAP, "ns")), timeout=5)  # the lane is full
    assert [e.object["metadata"]["name"] for e in events] == ["w"]
    env.server.reply(200, cm("lease"))
    env.server.routes.insert(0, env.server.routes.pop())
    lease = await asyncio.wait_for(client.unfenced().get(CONFIGMAP, "ns", "lease"), timeout=5)  # the Lease's
    assert lease["metadata"]["name"] == "lease"
    env.server.reply(200, "pulling 42%")
    env.server.routes.insert(0, env.server.routes.pop())
    tail = await asyncio.wait_for(client.log_tail("ns", "p", "c", 10, 1000, 5), timeout=5)  # (the kubelet's)
    assert tail == "pulling 42%"
    assert len(env.server.seen) == 5 and in_flight[0] == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*reads), timeout=5)
    assert len(env.server.seen) == 8
    assert in_flight[1] == 2  # never more than two at once


async def test_a_status_write_goes_ahead_of_the_childrens_writes_queued_before_it(env: Env) -> None:
    """A burst's children queue for the lane; a ModelAPI's status, what its user waits for, is sent next."""
    client = KubeClient(env.client._api, max_in_flight=1)
    release = asyncio.Event()

    async def held(_: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response(cm())

    env.server.routes.extend([held] * 4)
    writes = [asyncio.create_task(client.apply(cm(f"child-{i}"), "m")) for i in range(3)]
    while client.lane.waiting < 2:
        await asyncio.sleep(0.01)
    writes.append(asyncio.create_task(client.apply_status(cm("modelapi", status={}), "m")))
    while client.lane.waiting < 3:
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.wait_for(asyncio.gather(*writes), timeout=5)
    assert [(s.path.rsplit("/", 2)[-2:]) for s in env.server.seen] == [
        ["configmaps", "child-0"], ["modelapi", "status"], ["configmaps", "child-1"], ["configmaps", "child-2"]]
    assert client.lane.waiting == 0


async def test_lane_order_and_cancelled_waiters() -> None:
    lane = Lane(1)
    await lane.acquire(Place.QUEUED)
    order: list[str] = []

    async def take(name: str, place: Place) -> None:
        await lane.acquire(place)
        order.append(name)
        lane.release()

    tasks = {name: asyncio.create_task(take(name, place)) for name, place in
             [("a", Place.QUEUED), ("gone", Place.QUEUED), ("b", Place.QUEUED), ("first", Place.FIRST)]}
    while lane.waiting < 4:
        await asyncio.sleep(0)
    tasks["gone"].cancel()  # a cancelled waiter leaves the line, and takes no place
    with contextlib.suppress(asyncio.CancelledError):
        await tasks["gone"]
    assert lane.waiting == 3
    lane.release()
    await asyncio.wait_for(asyncio.gather(tasks["a"], tasks["b"], tasks["first"]), timeout=5)
    assert order == ["first", "a", "b"]
    await asyncio.wait_for(lane.acquire(Place.QUEUED), timeout=1)  # every place given back


async def test_a_waiter_cancelled_once_handed_the_place_passes_it_on() -> None:
    lane = Lane(1)
    await lane.acquire(Place.QUEUED)
    handed = asyncio.create_task(lane.acquire(Place.QUEUED))
    nxt = asyncio.create_task(lane.acquire(Place.QUEUED))
    while lane.waiting < 2:
        await asyncio.sleep(0)
    lane.release()  # the place is handed to `handed`, which is cancelled before it runs
    handed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handed
    await asyncio.wait_for(nxt, timeout=1)
    assert lane.waiting == 0


async def test_a_lane_of_zero_never_waits() -> None:
    lane = Lane(0)
    for _ in range(100):
        await asyncio.wait_for(lane.acquire(Place.QUEUED), timeout=1)
    lane.release()
    assert lane.waiting == 0
