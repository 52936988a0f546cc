"""A stand-in for Ollama's public registry (registry.ollama.ai), served on loopback for real `ollama pull`.

The protocol is the one Ollama 0.12.6 speaks (server/images.go, server/download.go):
- GET /v2/<namespace>/<model>/manifests/<tag> answers the manifest; 404 for a model it does not hold,
  which Ollama reports as "pull model manifest: file does not exist";
- HEAD and GET /v2/<namespace>/<model>/blobs/<digest> redirect (307) to a direct blob URL on another host,
  as the real registry redirects to its object store; Ollama stops at that redirect, then fetches the blob
  from there with Range requests.

HTTPS only, with a certificate from a CA made for the session (`TestCA`): the Ollama process trusts it
through SSL_CERT_FILE, like any Go program. The name registry.ollama.ai reaches the stand-in through a
CONNECT proxy on loopback (`ConnectProxy`) that the process is given as HTTPS_PROXY, the usual corporate
set-up: Go's HTTP client honours it for the registry and never for loopback, so model names stay exactly
as a user writes them (`smollm2:135m`, `library/x:tag`) and nothing resolves or leaves the machine. The
proxy refuses every other destination. The direct blob URLs point at 127.0.0.1, which Go never proxies.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from e2e.tiny_model import MANIFEST_TYPE, RegistryModel

REGISTRY_HOST = "registry.ollama.ai"

MANIFEST_PATH = re.compile(r"^/v2/(?P<repo>[^/]+/[^/]+)/manifests/(?P<tag>[^/]+)$")
BLOB_PATH = re.compile(r"^/v2/(?P<repo>[^/]+/[^/]+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
DIRECT_PATH = re.compile(r"^/direct/(?P<digest>sha256:[0-9a-f]{64})$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


# --- a CA for the session ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestCA:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, folder: Path, names: tuple[str, ...] = (REGISTRY_HOST,), ip: str = "127.0.0.1") -> TestCA:
        """A throw-away CA (valid for a day) and one server certificate for `names` and `ip`."""
        folder.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
        key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.crt"
        ext = folder / "server.ext"
        sans = ",".join([*(f"DNS:{n}" for n in names), f"IP:{ip}"])
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_cert, "-days", "1",
                 "-subj", "/CN=kaos-modelapi test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={names[0]}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", cert, "-days", "1", "-extfile", ext)
        return cls(ca_cert, cert, key)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


# --- the registry -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    host: str
    user_agent: str
    range: str | None


@dataclass
class Registry:
    """What the registry holds (repository `namespace/model` -> tag -> model) and what it was asked."""

    models: dict[tuple[str, str], RegistryModel] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"  # where it listens; the direct blob URLs point there
    # Bytes a second for blob bodies (None: as fast as the socket goes), so a pull lasts long enough for a
    # test to watch its progress, as a large model over a slow link would.
    blob_rate: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, reference: str, model: RegistryModel) -> None:
        """`reference` as a user writes it: `name:tag`, `namespace/name:tag`, `name` (tag latest)."""
        name, _, tag = reference.partition(":")
        repo = name if "/" in name else f"library/{name}"
        self.models[(repo, tag or "latest")] = model

    def blob(self, wanted: str) -> bytes | None:
        for model in self.models.values():
            if wanted in model.blobs:
                return model.blobs[wanted]
        return None

    def record(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def seen(self) -> list[Request]:
        with self.lock:
            return list(self.requests)


class _RegistryHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real one; every answer carries Content-Length
    server: _RegistryServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        registry = self.server.registry
        registry.record(Request(self.command, self.path, self.headers.get("Host", ""),
                                self.headers.get("User-Agent", ""), self.headers.get("Range")))
        if m := MANIFEST_PATH.match(self.path):
            model = registry.models.get((m["repo"], m["tag"]))
            if model is None:
                return self._error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {m['repo']}:{m['tag']}", body)
            return self._send(200, model.manifest, MANIFEST_TYPE, body)
        if m := BLOB_PATH.match(self.path):
            if registry.blob(m["digest"]) is None:
                return self._error(404, "BLOB_UNKNOWN", "blob unknown", body)
            return self._redirect(f"https://{registry.host}:{registry.port}/direct/{m['digest']}")
        if m := DIRECT_PATH.match(self.path):
            data = registry.blob(m["digest"])
            if data is None:
                return self._error(404, "BLOB_UNKNOWN", "blob unknown", body)
            return self._send_range(data, body)
        return self._error(404, "NOT_FOUND", "not found", body)

    def _send(self, status: int, data: bytes, content_type: str, body: bool,
              headers: dict[str, str] | None = None, rate: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self._write(data, rate)

    def _write(self, data: bytes, rate: int | None) -> None:
        if rate is None:
            self.wfile.write(data)
            return
        # A tenth of a second's worth at a time: a steady trickle (Ollama retries a part that stalls 30 s).
        step = max(1, rate // 10)
        for start in range(0, len(data), step):
            self.wfile.write(data[start : start + step])
            self.wfile.flush()
            time.sleep(0.1)

    def _send_range(self, data: bytes, body: bool) -> None:
        wanted = RANGE.match(self.headers.get("Range") or "")
        if wanted is None:
            return self._send(200, data, "application/octet-stream", body, {"Accept-Ranges": "bytes"},
                              rate=self.server.registry.blob_rate)
        start = int(wanted[1])
        end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
        part = data[start : end + 1]
        self._send(206, part, "application/octet-stream", body,
                   {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"},
                   rate=self.server.registry.blob_rate)

    def _redirect(self, location: str) -> None:
        self._send(307, b"", "text/plain", False, {"Location": location})

    def _error(self, status: int, code: str, message: str, body: bool) -> None:
        data = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, data, "application/json", body)


class _RegistryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, registry: Registry, context: ssl.SSLContext) -> None:
        super().__init__((registry.host, 0), _RegistryHandler)
        self.registry = registry
        self.context = context

    def get_request(self) -> tuple[socket.socket, Any]:
        # The handshake happens in the handler's thread (on first read), so a slow client blocks no one.
        conn, addr = super().get_request()
        return self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr


# --- the CONNECT proxy ------------------------------------------------------------------------------------


@dataclass
class ConnectLog:
    allowed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_CONNECT(self) -> None:
        target = self.path
        if target != f"{REGISTRY_HOST}:443":
            self.server.log.refused.append(target)
            self.send_error(403, "this proxy only reaches the stand-in registry")
            return
        self.server.log.allowed.append(target)
        upstream = socket.create_connection(self.server.upstream, timeout=30)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        _pump(self.connection, upstream)

    def do_GET(self) -> None:
        self.server.log.refused.append(self.path)
        self.send_error(403, "plain HTTP is not proxied")


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with b, selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        while True:
            for key, _ in sel.select(timeout=60):
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                data = source.recv(65536)
                if not data:
                    return
                key.data.sendall(data)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], log: ConnectLog) -> None:
        super().__init__((upstream[0], 0), _ProxyHandler)
        self.upstream = upstream
        self.log = log


# --- together -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningRegistry:
    registry: Registry
    ca: TestCA
    proxy_port: int
    connects: ConnectLog

    def client_env(self, ca_file: str | None = None) -> dict[str, str]:
        """What an Ollama process needs to pull from the stand-in: the usual proxy and CA variables.
        `ca_file`: where the process sees the CA (in a pod, a mounted copy). Go never proxies loopback;
        another listening address (a pod's way to the host) is exempted with NO_PROXY so that the direct
        blob URLs are fetched straight."""
        host = self.registry.host
        env = {"HTTPS_PROXY": f"http://{host}:{self.proxy_port}", "SSL_CERT_FILE": ca_file or str(self.ca.ca_cert)}
        if host != "127.0.0.1":
            env["NO_PROXY"] = host
        return env


@contextmanager
def running_registry(folder: Path, host: str = "127.0.0.1") -> Iterator[RunningRegistry]:
    """The registry and its CONNECT proxy listening on `host`: loopback for local processes, the host's
    end of a real node's veth for pods."""
    ca = TestCA.create(folder, ip=host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    registry = Registry(host=host)
    server = _RegistryServer(registry, context)
    registry.port = server.server_address[1]
    connects = ConnectLog()
    proxy = _ProxyServer((host, registry.port), connects)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (server, proxy)]
    for t in threads:
        t.start()
    try:
        yield RunningRegistry(registry, ca, proxy.server_address[1], connects)
    finally:
        for s in (server, proxy):
            s.shutdown()
            s.server_close()
