"""Traefik, the local cluster's Gateway API implementation, built from its Go module (e2e/gateway).

The real node (e2e/node.py) runs it as a daemon in its network namespace, beside CoreDNS: its
Kubernetes Gateway provider watches Gateways and HTTPRoutes with the node's kubeconfig, writes their
status, and forwards requests from the entry point on the node's address (port 8000) to the pods of
each route's backend Service. The host reaches it at http://<node address>:8000, as it reaches pods.

The build (see e2e/gateway/README.md for why each step):
- the module's own pins (go.mod/go.sum beside it), Traefik's replace/exclude directives repeated;
- lego's ACME DNS-provider registry is swapped for e2e/gateway/overlay/lego_dns_providers.go, in a
  copy of the checksum-verified lego module that a generated go.mod (-modfile) points at, because
  the module proxy does not serve the SDK modules of fourteen DNS vendors that registry imports.
  Traefik's own sources are built as the module proxy serves them.

The standard library only, like cluster.py and node.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python e2e/traefik.py build
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import buildcache, cluster
from e2e.operator_process import GATEWAY_NAME, GATEWAY_NAMESPACE

SRC = Path(__file__).resolve().parent / "gateway"
TRAEFIK = "github.com/traefik/traefik/v3"
LEGO = "github.com/go-acme/lego/v5"
LEGO_REGISTRY = "providers/dns/zz_gen_dns_providers.go"
OVERLAY = SRC / "overlay" / "lego_dns_providers.go"
RECIPE = "1"  # part of the cache key: bump it when the build steps below change
GATEWAY_CLASS = "traefik"
CONTROLLER = "traefik.io/gateway-controller"  # the controllerName Traefik's provider claims
PORT = 8000  # the entry point, and the Gateway listener's port (Traefik pairs them by port)
LISTENER = "http"


class TraefikError(cluster.ClusterError):
    """Traefik did not build; str() says where to look."""


# ---------------------------------------------------------------------------------------- build


def source_key() -> str:
    """sha256 of the pins, the extension stub, the overlay and the recipe: the binary's cache key."""
    h = hashlib.sha256(RECIPE.encode())
    files = [SRC / "go.mod", SRC / "go.sum", *sorted((SRC / "ext").iterdir()), OVERLAY]
    for path in files:
        h.update(str(path.relative_to(SRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def version() -> str:
    for line in (SRC / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == [TRAEFIK] and len(parts) > 1:
            return parts[1]
        if parts[:2] == ["require", TRAEFIK] and len(parts) > 2:
            return parts[2]
    raise TraefikError(f"{SRC / 'go.mod'} does not require {TRAEFIK}")


def binary(log_fn: Callable[[str], None] = cluster.say) -> Path:
    """Traefik built from e2e/gateway unless cached in ~/.cache/kaos-modelapi/traefik/<key>/."""
    target = cluster.cache_root().parent / "traefik" / source_key() / "traefik"
    return buildcache.build_once(target, lambda tmp: _build(tmp, log_fn), log_fn)


def _go(*args: str, out: Any, modfile: Path | None = None) -> None:
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    cmd = ["go", *args[:1], *([f"-modfile={modfile}"] if modfile else []), *args[1:]]
    out.write("$ " + " ".join(cmd) + "\n")
    out.flush()
    if subprocess.call(cmd, cwd=SRC, env=env, stdout=out, stderr=subprocess.STDOUT) != 0:
        raise TraefikError(f"Traefik did not build: see {out.name}")


def _build(tmp: Path, log_fn: Callable[[str], None]) -> None:
    work = tmp.parent / f"work.{os.getpid()}"
    build_log = tmp.parent / "build.log"
    began = time.monotonic()
    log_fn(f"building Traefik {version()} from e2e/gateway (a cold build takes several minutes) ...")
    try:
        with open(build_log, "w") as out:
            modfile = _prepare(work, out)
            jobs = os.environ.get("KAOS_BUILD_JOBS", "2")
            ldflags = f"-s -w -X {TRAEFIK}/pkg/version.Version={version()}"
            _go("build", f"-p={jobs}", "-trimpath", "-buildvcs=false", "-ldflags", ldflags, "-o", str(tmp),
                f"{TRAEFIK}/cmd/traefik", out=out, modfile=modfile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log_fn(f"built {tmp.parent} in {time.monotonic() - began:.0f} s")


def _prepare(work: Path, out: Any) -> Path:
    """A copy of the pinned lego module with the DNS-provider registry swapped, and a go.mod that uses it."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    listing = work / "lego.json"
    with open(listing, "w") as dl:  # downloads lego if needed, checked against go.sum
        code = subprocess.call(["go", "mod", "download", "-json", LEGO], cwd=SRC, stdout=dl, stderr=out,
                               env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"})
    if code != 0:
        raise TraefikError(f"`go mod download {LEGO}` failed: see {out.name}")
    lego = work / "lego"
    shutil.copytree(json.loads(listing.read_text())["Dir"], lego)
    for path in [lego, *lego.rglob("*")]:  # the module cache's files are read-only
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    (lego / LEGO_REGISTRY).unlink()
    shutil.copy(OVERLAY, lego / Path(LEGO_REGISTRY).parent / OVERLAY.name)
    gomod = (SRC / "go.mod").read_text().replace("=> ./ext", f"=> {SRC / 'ext'}")
    modfile = work / "go.mod"
    modfile.write_text(f"{gomod}\nreplace {LEGO} => {lego}\n")
    shutil.copy(SRC / "go.sum", work / "go.sum")
    return modfile


# ---------------------------------------------------------------------------------- the daemon


def static_config(node_ip: str) -> str:
    """Traefik's static configuration on the node: one entry point, the Gateway provider, no phoning home."""
    return json.dumps({
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
        "entryPoints": {"web": {"address": f"{node_ip}:{PORT}"}},
        # The Gateway's status.addresses: where a client on this machine sends its requests.
        "providers": {"kubernetesGateway": {"statusAddress": {"ip": node_ip}}},
        "log": {"level": "INFO", "noColor": True},
    }, indent=1)


def gateway_objects() -> list[tuple[str, dict[str, Any]]]:
    """(collection path, object) of the GatewayClass, namespace and Gateway the operator's routes attach to."""
    gateways = f"/apis/gateway.networking.k8s.io/v1/namespaces/{GATEWAY_NAMESPACE}/gateways"
    return [
        ("/apis/gateway.networking.k8s.io/v1/gatewayclasses", {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS}, "spec": {"controllerName": CONTROLLER}}),
        ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": GATEWAY_NAMESPACE}}),
        (gateways, {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE},
            "spec": {"gatewayClassName": GATEWAY_CLASS, "listeners": [{
                "name": LISTENER, "protocol": "HTTP", "port": PORT,
                # ModelAPIs live in every namespace; their routes attach from there.
                "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
    ]


def main(argv: list[str]) -> int:
    if argv[1:] == ["build"]:
        try:
            print(binary())
        except cluster.ClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    print(f"usage: {argv[0]} build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
