"""Where the API server is and how to prove who we are: a kubeconfig file, or a pod's ServiceAccount.

The operator used kubernetes_asyncio only for this, yet importing any part of that package imports its
client with thousands of generated models: about 66 MiB of memory and over a second of start-up, for a few
dozen lines of YAML reading. This module reads the same files the way kubectl does (the current context's
cluster and user, paths relative to the file, KUBECONFIG lists merged first-wins) and keeps one aiohttp
session to the server.

Supported credentials: client certificates (file or inline), bearer tokens (inline, a token file re-read as
it rotates, or an exec plugin's ExecCredential, run again when it expires), basic auth. Legacy
auth-provider plugins (gcp, oidc, azure) are refused with a message naming the exec plugin to use instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE_REREAD_SECONDS = 60.0  # as client-go: a rotated projected token is picked up within a minute
EXEC_API_VERSION = "client.authentication.k8s.io/v1"
CONNECTION_LIMIT = 100  # requests in flight to the API server at once (watches included)
READ_BUFFER = 2**21  # a watch line holds a whole object: etcd's limit is 1.5 MiB
HINT = "(pass --kubeconfig FILE, set KUBECONFIG, or run in a pod with a ServiceAccount)"


class ConfigError(Exception):
    """No usable credentials: the kubeconfig is missing or unreadable, or in-cluster config is incomplete."""


# --- credentials -----------------------------------------------------------------------------------------


class Credentials:
    """No Authorization header (client certificates, or none at all)."""

    async def authorization(self) -> str | None:
        return None


@dataclass
class StaticToken(Credentials):
    header: str

    async def authorization(self) -> str | None:
        return self.header


@dataclass
class TokenFile(Credentials):
    """A bearer token read from a file, again once a minute: kubelet rotates projected tokens in place."""

    path: Path
    _token: str = ""
    _read_at: float = -1e9

    async def authorization(self) -> str | None:
        if time.monotonic() - self._read_at >= TOKEN_FILE_REREAD_SECONDS:
            try:
                self._token = self.path.read_text().strip()
            except OSError as e:
                if not self._token:
                    raise ConfigError(f"cannot read the token file {self.path}: {e.strerror}") from None
            self._read_at = time.monotonic()
        return f"Bearer {self._token}"


@dataclass
class ExecPlugin(Credentials):
    """A client-go credential plugin: run `command`, read the ExecCredential it prints, run it again when
    the token expires."""

    command: str
    args: list[str]
    env: dict[str, str]
    api_version: str
    cluster_server: str
    _token: str = ""
    _expires: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def authorization(self) -> str | None:
        async with self._lock:
            if not self._token or (self._expires is not None and time.time() >= self._expires):
                await self._run()
        return f"Bearer {self._token}"

    async def _run(self) -> None:
        info = {"apiVersion": self.api_version, "kind": "ExecCredential",
                "spec": {"interactive": False, "cluster": {"server": self.cluster_server}}}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            proc = await asyncio.create_subprocess_exec(self.command, *self.args, env=env,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
        except OSError as e:
            raise ConfigError(f"cannot run the credential plugin {self.command}: {e.strerror or e}") from None
        if proc.returncode != 0:
            raise ConfigError(f"the credential plugin {self.command} exited with {proc.returncode}: "
                              f"{err.decode(errors='replace').strip()[:500]}")
        try:
            status = json.loads(out)["status"]
            self._token = str(status["token"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"the credential plugin {self.command} printed no ExecCredential with a token "
                              "(plugins that return client certificates are not supported)") from None
        expiry = status.get("expirationTimestamp")
        self._expires = _timestamp(expiry) - 10 if expiry else None  # a little early: the clocks may differ


def _timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()


# --- the connection ----------------------------------------------------------------------------------------


@dataclass
class Connection:
    """The API server's address, TLS and credentials, and one pooled session to it (made on first use,
    inside the event loop). Proxies come from the kubeconfig's proxy-url or, as client-go, from
    HTTPS_PROXY/HTTP_PROXY/NO_PROXY, resolved once here and not at every request."""

    host: str
    ssl_context: ssl.SSLContext | None = None
    credentials: Credentials = field(default_factory=Credentials)
    proxy: str | None = None
    tls_server_name: str | None = None
    _session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ssl=self.ssl_context or True)
            # trust_env=False: the environment's proxies are resolved once (see `environment_proxy`);
            # with it on, aiohttp reads ~/.netrc and the proxy variables in a thread at every request.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, read_bufsize=READ_BUFFER)
        return self._session

    def moved_to(self, host: str) -> Connection:
        """The same credentials and TLS against another address (e.g. a proxy in tests); its own session."""
        return replace(self, host=host, _session=None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def environment_proxy(server: str) -> str | None:
    """The proxy the environment names for `server`, unless NO_PROXY exempts it (as client-go)."""
    url = urlsplit(server)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme or "https")
    if not proxy or (url.hostname and urllib.request.proxy_bypass(url.hostname)):
        return None
    return proxy


# --- loading -----------------------------------------------------------------------------------------------


def load(kubeconfig: str | None) -> Connection:
    """From the given kubeconfig file; else in-cluster credentials when running in a pod; else the default
    kubeconfig ($KUBECONFIG or ~/.kube/config), as kubectl would."""
    if kubeconfig is not None:
        if not os.path.isfile(kubeconfig):
            raise ConfigError(f"cannot load the kubeconfig {kubeconfig}: no such file {HINT}")
        return _from_files([Path(kubeconfig)], kubeconfig)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    listed = os.environ.get("KUBECONFIG", "")
    paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p] or [Path("~/.kube/config").expanduser()]
    where = listed or "~/.kube/config"
    existing = [p for p in paths if p.is_file()]
    if not existing:
        raise ConfigError(f"cannot load the kubeconfig {where}: no such file {HINT}")
    return _from_files(existing, where)


def in_cluster(root: Path = SERVICE_ACCOUNT) -> Connection:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(f"in-cluster config: KUBERNETES_SERVICE_HOST and _PORT must both be set {HINT}")
    token, ca = root / "token", root / "ca.crt"
    if not token.is_file() or not ca.is_file():
        raise ConfigError(f"in-cluster config: no ServiceAccount token or CA under {root} {HINT}")
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return Connection(server, ssl.create_default_context(cafile=str(ca)), TokenFile(token),
                      environment_proxy(server))


def _from_files(paths: list[Path], where: str) -> Connection:
    try:
        docs = [(p, yaml.safe_load(p.read_text()) or {}) for p in paths]
        return from_kubeconfig(docs)
    except ConfigError as e:
        raise ConfigError(f"cannot load the kubeconfig {where}: {e} {HINT}") from None
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError, ssl.SSLError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"cannot load the kubeconfig {where}: {reason} {HINT}") from None


def from_kubeconfig(docs: list[tuple[Path, Mapping[str, Any]]]) -> Connection:
    """The current context of one or more kubeconfig documents (the first to name something wins)."""
    current = next((d.get("current-context") for _, d in docs if d.get("current-context")), None)
    if not current:
        raise ConfigError("it has no current-context")
    context, _ = _named(docs, "contexts", "context", current)
    cluster, cluster_dir = _named(docs, "clusters", "cluster", str(context.get("cluster") or ""))
    user, user_dir = (_named(docs, "users", "user", str(context["user"]))
                      if context.get("user") else ({}, Path.cwd()))
    server = str(cluster.get("server") or "")
    if not server:
        raise ConfigError(f"cluster {context.get('cluster')!r} has no server")
    ssl_context = _ssl_context(cluster, cluster_dir, user, user_dir) if server.startswith("https") else None
    proxy = str(cluster["proxy-url"]) if cluster.get("proxy-url") else environment_proxy(server)
    return Connection(server.rstrip("/"), ssl_context, _credentials(user, user_dir, server), proxy,
                      cluster.get("tls-server-name"))


def _named(docs: list[tuple[Path, Mapping[str, Any]]], section: str, key: str,
           name: str) -> tuple[Mapping[str, Any], Path]:
    for path, doc in docs:
        for entry in doc.get(section) or []:
            if entry.get("name") == name:
                return entry.get(key) or {}, path.resolve().parent
    raise ConfigError(f"no {key} named {name!r}")


def _data_or_file(entry: Mapping[str, Any], name: str, base: Path) -> tuple[bytes | None, Path | None]:
    if entry.get(f"{name}-data"):
        return base64.b64decode(entry[f"{name}-data"]), None
    if entry.get(name):
        return None, base / Path(entry[name]).expanduser()
    return None, None


def _ssl_context(cluster: Mapping[str, Any], cluster_dir: Path, user: Mapping[str, Any],
                 user_dir: Path) -> ssl.SSLContext:
    ca_data, ca_file = _data_or_file(cluster, "certificate-authority", cluster_dir)
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None,
                                         cadata=ca_data.decode() if ca_data else None)
    if cluster.get("insecure-skip-tls-verify"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert_data, cert_file = _data_or_file(user, "client-certificate", user_dir)
    key_data, key_file = _data_or_file(user, "client-key", user_dir)
    if cert_data or cert_file:
        _load_cert_chain(context, cert_data, cert_file, key_data, key_file)
    return context


def _load_cert_chain(context: ssl.SSLContext, cert_data: bytes | None, cert_file: Path | None,
                     key_data: bytes | None, key_file: Path | None) -> None:
    """The ssl module reads certificates from files only: inline ones go through a private temporary
    folder that is removed as soon as they are loaded."""
    with tempfile.TemporaryDirectory(prefix="kaos-tls-") as folder:
        if cert_data is not None:
            cert_file = Path(folder) / "client.crt"
            cert_file.write_bytes(cert_data)
        if key_data is not None:
            key_file = Path(folder) / "client.key"
            key_file.write_bytes(key_data)
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)


def _credentials(user: Mapping[str, Any], user_dir: Path, server: str) -> Credentials:
    if user.get("auth-provider"):
        name = (user["auth-provider"] or {}).get("name", "?")
        raise ConfigError(f"the {name!r} auth-provider is not supported: use an exec credential plugin "
                          "(e.g. kubelogin, gke-gcloud-auth-plugin)")
    if user.get("token"):
        return StaticToken(f"Bearer {user['token']}")
    if user.get("tokenFile"):
        return TokenFile(user_dir / Path(user["tokenFile"]).expanduser())
    if user.get("exec"):
        spec = user["exec"]
        env = {str(e["name"]): str(e["value"]) for e in spec.get("env") or []}
        return ExecPlugin(str(spec["command"]), [str(a) for a in spec.get("args") or []], env,
                          str(spec.get("apiVersion") or EXEC_API_VERSION), server)
    if user.get("username") and user.get("password"):
        basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
        return StaticToken(f"Basic {basic}")
    return Credentials()
