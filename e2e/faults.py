"""Fault injection tools for e2e/test_faults.py: proxies between the operator and the API server.

- Forwarder forwards bytes (TLS passes through untouched) and can cut every connection and refuse new ones
  (a broken network), or stall them (a silent one: nothing flows, nothing is closed), then restore;
  TcpProxy runs one for synchronous tests.
- FaultProxy terminates TLS with the API server's own serving certificate (so a client that trusts the
  cluster's CA trusts it) and forwards each request with the admin's client certificate, the operator's
  credentials. It can answer every request with an error (429 with Retry-After, 500) for a while, make the
  next watch of each resource resume from a resourceVersion the API server no longer holds (the server
  itself then answers 410 Gone), and it records the writes that passed through, for leader checks.

TcpProxy and FaultProxy run their asyncio loop on a daemon thread, so synchronous tests (kubectl, subprocesses)
drive them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import aiohttp
import yaml
from aiohttp import web

T = TypeVar("T")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Hop-by-hop headers, and the ones aiohttp sets itself for the body it sends.
_SKIP_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "content-length",
                           "proxy-connection", "te", "trailer"})


class LoopThread:
    """An asyncio loop on a daemon thread; run() executes a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fault-proxy")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


def kubeconfig_via(kubeconfig: Path, port: int, out: Path) -> Path:
    """A copy of `kubeconfig` whose server is 127.0.0.1:port (same host: the certificate still matches)."""
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{port}"
    out.write_text(yaml.safe_dump(config))
    return out


# ----------------------------------------------------------------------------------------- TCP proxy


class Forwarder:
    """Loopback TCP forwarder (TLS passes through untouched) on the running loop: it can cut every connection
    and refuse new ones (a broken network), or stall them (a silent one: nothing flows, nothing is closed),
    then restore. Async tests use it directly; TcpProxy drives one from a thread."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._refusing = False
        self.accepted = 0

    async def start(self) -> int:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        """Reset every connection and refuse new ones: the client sees the network fail at once."""
        self._refusing = True
        for writer in list(self._writers):
            writer.transport.abort()

    def stall(self) -> None:
        """Stop forwarding in both directions, closing nothing. New connections are accepted and held."""
        self._flowing.clear()

    def restore(self) -> None:
        self._refusing = False
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        self._flowing.set()  # stalled pumps wake up and find their connections closed
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        self.accepted += 1
        await self._flowing.wait()  # a stalled network holds the new connection
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            for pump in pumps:
                pump.cancel()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                await self._flowing.wait()  # stalled: hold what was read; TCP flow control holds the rest
                dst.write(data)
                await dst.drain()


class TcpProxy:
    """A Forwarder to the API server on loopback, on its own loop thread, for synchronous tests."""

    def __init__(self, upstream_port: int) -> None:
        self._loop = LoopThread()
        self._forwarder = Forwarder("127.0.0.1", upstream_port)
        self.port = 0

    def start(self) -> int:
        self.port = self._loop.run(self._forwarder.start())
        return self.port

    def cut(self) -> None:
        self._on_loop(self._forwarder.cut)

    def stall(self) -> None:
        self._on_loop(self._forwarder.stall)

    def restore(self) -> None:
        self._on_loop(self._forwarder.restore)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Call fn on the proxy's loop and return once it has run."""
        async def call() -> None:
            fn()

        self._loop.run(call())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._forwarder.close())
        self._loop.close()


# ------------------------------------------------------------------------------------------ L7 proxy


@dataclass(frozen=True)
class Write:
    at: float  # time.monotonic() when the proxy received it
    method: str
    path: str


class FaultProxy:
    """HTTPS proxy to the API server that injects errors and 410s and records writes (see the module doc)."""

    def __init__(self, upstream_port: int, pki: Path) -> None:
        self._upstream = f"https://127.0.0.1:{upstream_port}"
        self._pki = pki
        self._loop = LoopThread()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._failing: tuple[int, float] | None = None  # (status, until monotonic)
        self._expire: set[str] = set()  # resources whose next watch resumes from a vanished resourceVersion
        self._expire_all = False
        self._watches: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.writes: list[Write] = []
        self.injected: dict[int, int] = {}  # status -> requests answered with it by the proxy
        self.expired: list[str] = []  # watch paths sent on with a vanished resourceVersion
        self.requests = 0

    def start(self) -> int:
        self.port = self._loop.run(self._start())
        return self.port

    async def _start(self) -> int:
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(self._pki / "apiserver.crt", self._pki / "apiserver.key")
        upstream = ssl.create_default_context(cafile=str(self._pki / "ca.crt"))
        upstream.load_cert_chain(self._pki / "admin.crt", self._pki / "admin.key")
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=upstream, limit=0),
                                              auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=serving)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        return int(server.sockets[0].getsockname()[1])

    def fail(self, status: int, seconds: float) -> None:
        """Answer every request with `status` for `seconds` (ongoing watches are cut, as a failing server's)."""
        async def fail() -> None:
            self._failing = (status, time.monotonic() + seconds)
            self._cut_watches()

        self._loop.run(fail())

    def expire_watches(self) -> None:
        """Cut every watch; the next watch of each resource resumes from resourceVersion 1, which the API
        server's watch cache no longer holds once it has started (or the resource's storage started)
        after it: the server answers 410 Gone and the client must relist."""
        async def expire() -> None:
            self._expire_all = True
            self._expire.clear()
            self._cut_watches()

        self._loop.run(expire())

    def writes_since(self, at: float) -> list[Write]:
        return [w for w in list(self.writes) if w.at >= at]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self._close())
        self._loop.close()

    async def _close(self) -> None:
        self._cut_watches()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _cut_watches(self) -> None:
        for task in list(self._watches):
            task.cancel()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method in WRITE_METHODS:
            self.writes.append(Write(time.monotonic(), request.method, request.path))
        if self._failing is not None and time.monotonic() < self._failing[1]:
            return self._error(self._failing[0])
        query = list(parse_qsl(request.query_string, keep_blank_values=True))
        watch = any(k == "watch" and v in ("1", "true") for k, v in query)
        if watch and self._expire_all and request.path not in self._expire:
            self._expire.add(request.path)
            self.expired.append(request.path)
            query = [(k, "1" if k == "resourceVersion" else v) for k, v in query]
        task = asyncio.current_task()
        if watch and task is not None:
            self._watches.add(task)
        try:
            return await self._forward(request, query)
        finally:
            if task is not None:
                self._watches.discard(task)

    def _error(self, status: int) -> web.Response:
        self.injected[status] = self.injected.get(status, 0) + 1
        reason = {429: "TooManyRequests", 500: "InternalError"}.get(status, "InternalError")
        body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": f"injected by the fault proxy ({status})", "reason": reason,
                                "code": status}
        headers = {}
        if status == 429:
            body["details"] = {"retryAfterSeconds": 1}
            headers["Retry-After"] = "1"
        return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                            headers=headers)

    async def _forward(self, request: web.Request, query: list[tuple[str, str]]) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
        url = self._upstream + request.path + ("?" + urlencode(query) if query else "")
        body = await request.read()
        response = web.StreamResponse()
        try:
            async with self._session.request(request.method, url, headers=headers, data=body or None) as up:
                response.set_status(up.status, up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _SKIP_HEADERS:
                        response.headers.add(k, v)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, ConnectionError):
            if not response.prepared:
                return self._error(502)
            if request.transport is not None:  # mid-body: the client must see the stream break
                request.transport.abort()
            return response
