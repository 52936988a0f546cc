"""Loading a kubeconfig or in-cluster credentials: the same files kubectl reads give the same server,
TLS and credentials (the real API server is reached this way in every e2e test)."""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaos_modelapi import kubeconfig
from kaos_modelapi.kubeconfig import ConfigError, ExecPlugin, StaticToken, TokenFile


def write(path: Path, cluster: dict[str, Any], user: dict[str, Any] | None = None, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": cluster}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": user or {}}],
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key (serves as both CA and client certificate here)."""
    folder = tmp_path_factory.mktemp("pki")
    crt, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=test", "-days", "1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    return crt, key


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_a_token_user_gives_the_server_and_a_bearer_header(tmp_path: Path) -> None:
    path = write(tmp_path / "config", {"server": "https://127.0.0.1:6443/"}, {"token": "abc"})
    connection = kubeconfig.load(str(path))
    assert connection.host == "https://127.0.0.1:6443"
    assert await connection.credentials.authorization() == "Bearer abc"
    assert isinstance(connection.ssl_context, ssl.SSLContext) and connection.proxy is None


def test_certificate_files_are_relative_to_the_kubeconfig_and_inline_data_works(
    tmp_path: Path, cert: tuple[Path, Path]
) -> None:
    crt, key = cert
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(crt.read_bytes())
    (tmp_path / "pki" / "me.crt").write_bytes(crt.read_bytes())
    (tmp_path / "pki" / "me.key").write_bytes(key.read_bytes())
    by_file = write(tmp_path / "files", {"server": "https://k:6443", "certificate-authority": "pki/ca.crt"},
                    {"client-certificate": "pki/me.crt", "client-key": "pki/me.key"})
    context = kubeconfig.load(str(by_file)).ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test"),),)]

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    inline = write(tmp_path / "inline", {"server": "https://k:6443", "certificate-authority-data": b64(crt)},
                   {"client-certificate-data": b64(crt), "client-key-data": b64(key)})
    context = kubeconfig.load(str(inline)).ssl_context
    assert context is not None and len(context.get_ca_certs()) == 1


def test_insecure_skip_tls_verify_and_tls_server_name(tmp_path: Path) -> None:
    path = write(tmp_path / "config", {"server": "https://10.0.0.1", "insecure-skip-tls-verify": True,
                                       "tls-server-name": "api.example"})
    connection = kubeconfig.load(str(path))
    assert connection.ssl_context is not None and connection.ssl_context.verify_mode == ssl.CERT_NONE
    assert connection.tls_server_name == "api.example"


async def test_a_token_file_is_read_again_as_it_rotates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("one\n")
    path = write(tmp_path / "config", {"server": "http://k"}, {"tokenFile": "token"})
    credentials = kubeconfig.load(str(path)).credentials
    assert isinstance(credentials, TokenFile)
    assert await credentials.authorization() == "Bearer one"
    (tmp_path / "token").write_text("two\n")
    assert await credentials.authorization() == "Bearer one"  # not re-read at every request
    monkeypatch.setattr(kubeconfig, "TOKEN_FILE_REREAD_SECONDS", 0.0)
    assert await credentials.authorization() == "Bearer two"


async def test_an_exec_plugin_runs_again_once_its_token_expires(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = (
        "import json, os, pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n))\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'kind': 'ExecCredential', 'status': {'token': os.environ['PREFIX'] + str(n),"
        " 'expirationTimestamp': '2000-01-01T00:00:00Z'}}))\n"
    )
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": ["-c", script], "env": [{"name": "PREFIX", "value": "t"}]}}
    credentials = kubeconfig.load(str(write(tmp_path / "config", {"server": "http://k"}, user))).credentials
    assert isinstance(credentials, ExecPlugin)
    assert await credentials.authorization() == "Bearer t1"
    assert await credentials.authorization() == "Bearer t2"  # expired: asked again


async def test_a_failing_exec_plugin_is_a_config_error(tmp_path: Path) -> None:
    user = {"exec": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('no login')"]}}
    credentials = kubeconfig.load(str(write(tmp_path / "config", {"server": "http://k"}, user))).credentials
    with pytest.raises(ConfigError, match="no login"):
        await credentials.authorization()


async def test_basic_auth(tmp_path: Path) -> None:
    path = write(tmp_path / "config", {"server": "http://k"}, {"username": "a", "password": "b"})
    assert await kubeconfig.load(str(path)).credentials.authorization() == "Basic YTpi"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"current-context": ""}, "no current-context"),
        ({"current-context": "other"}, "no context named 'other'"),
        ({"users": [{"name": "u", "user": {"auth-provider": {"name": "gcp"}}}]}, "'gcp' auth-provider"),
        ({"clusters": [{"name": "c", "cluster": {}}]}, "has no server"),
    ],
)
def test_unusable_kubeconfigs_say_why(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    path = write(tmp_path / "config", {"server": "http://k"}, {"token": "t"}, **doc)
    with pytest.raises(ConfigError, match=message):
        kubeconfig.load(str(path))


def test_missing_or_broken_files_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        kubeconfig.load(str(tmp_path / "absent"))
    (tmp_path / "broken").write_text("{ not yaml")
    with pytest.raises(ConfigError, match="cannot load the kubeconfig"):
        kubeconfig.load(str(tmp_path / "broken"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="no such file"):
        kubeconfig.load(None)


async def test_kubeconfig_list_merges_first_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write(tmp_path / "a", {"server": "http://first"}, {"token": "one"})
    second = tmp_path / "b"
    second.write_text(yaml.safe_dump({"current-context": "y", "contexts": [
        {"name": "y", "context": {"cluster": "c", "user": "u"}}], "users": [{"name": "u", "user": {"token": "two"}}]}))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'none'}:{second}:{first}")
    connection = kubeconfig.load(None)
    assert connection.host == "http://first"  # the only cluster c
    assert await connection.credentials.authorization() == "Bearer two"  # b's context and user come first


async def test_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cert: tuple[Path, Path]) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(cert[0].read_bytes())
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    connection = kubeconfig.in_cluster(tmp_path)
    assert connection.host == "https://[fd00::1]:443"
    assert await connection.credentials.authorization() == "Bearer sa-token"
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT")
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST and _PORT"):
        kubeconfig.in_cluster(tmp_path)


def test_proxies_from_the_environment_or_the_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert kubeconfig.load(str(write(tmp_path / "a", {"server": "https://api.example"}))).proxy == "http://proxy:3128"
    assert kubeconfig.load(str(write(tmp_path / "b", {"server": "https://internal.example"}))).proxy is None
    chosen = write(tmp_path / "c", {"server": "https://api.example", "proxy-url": "http://other:8080"})
    assert kubeconfig.load(str(chosen)).proxy == "http://other:8080"


async def test_static_token_and_no_credentials() -> None:
    assert await StaticToken("Bearer x").authorization() == "Bearer x"
    assert await kubeconfig.Credentials().authorization() is None
