"""A real node for the local cluster: containerd, runc, CNI, kubelet, kube-proxy and CoreDNS.

The control plane (e2e/cluster.py) runs with `--real-node`; this module then adds the node
`kaos-real-node` beside the stand-in `kaos-node`. Everything the node creates that would be
machine-global lives in namespaces private to one cluster state folder, so parallel clusters do
not collide and clean-up is the removal of a few named things:

- a network namespace `kaos-<id>` (id: 8 hex digits of the state folder's hash) joined to the
  host by a veth pair `kh-<id>`/`kn-<id>` on 10.<o>.255.0/30 (o derived from id). The node's
  address is 10.<o>.255.2; pods get 10.<o>.0.0/24 on the bridge `cni0` inside the namespace. The
  namespace has no route out: an image that is not imported fails to pull at once, naming it.
  The Service range is routed into a port-less bridge there (_route_services).
  kube-proxy's and the kubelet's iptables chains, the bridges, the pod netns and conntrack
  entries are all inside it and vanish with it.
- a private mount namespace for containerd, the kubelet and the shims, with tmpfs over /run and
  /var/lib/cni: volume mounts, container rootfs mounts and the pods' netns files vanish with it.
- a cgroup `kaos-<id>` in every hierarchy: the supervisor, containerd, the shims and (as the
  kubelet's cgroupRoot) every container are under it; killing its processes ends everything.

Processes: `node.py host` (host namespaces) forwards 10.<o>.255.1:<apiserver port> to the
apiserver on loopback (the apiserver stays on 127.0.0.1) and runs `node.py inner` in the
namespaces, which supervises containerd, the kubelet, kube-proxy and CoreDNS. The host process
stops the node when the control plane exits, and removes the network namespace after it. A
record in /run/kaos-node/<id>.json lets a later start or `make cluster-down` sweep a node whose
processes were killed outright.

The standard library only, like cluster.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python e2e/node.py ...
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import buildcache, cluster, traefik

NODE_NAME = "kaos-real-node"
# Pods opt in with this nodeSelector and a toleration of this taint; all others go to the stand-in.
NODE_LABEL = "kaos.tools/real-node"
CLUSTER_DNS = "10.96.0.10"
SERVICE_CIDR = "10.96.0.0/16"  # the apiserver's --service-cluster-ip-range (e2e/controlplane/main.go)
SERVICE_SINK = "kaos-svc"  # a port-less bridge in the node's namespace (see _route_services)
CLUSTER_DOMAIN = "cluster.local"
RECORDS = Path("/run/kaos-node")
CGROUPS = Path("/sys/fs/cgroup")
START_TIMEOUT = 180.0
DEBIAN_PACKAGES = [
    "containerd", "runc", "containernetworking-plugins", "buildah", "iptables", "iproute2", "conntrack",
    "gcc", "libc6-dev", "util-linux", "openssl",
]
HERE = Path(__file__).resolve().parent


class NodeError(cluster.ClusterError):
    """A failure to set up, start or stop the real node; str() says what to do."""


def on_real_node(spec: dict[str, Any]) -> dict[str, Any]:
    """A pod spec (or a ModelAPI's podSpec override) that the scheduler places on the real node."""
    return {
        **spec,
        "nodeSelector": {NODE_LABEL: "true"},
        "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    }


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} node: {message}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


# ------------------------------------------------------------------------------------- identity


@dataclass
class Net:
    """The names and addresses of one cluster's node, all derived from its state folder."""

    id: str
    state: str
    octet: int
    apiserver_port: int
    host_pid: int = 0

    @classmethod
    def derive(cls, state: Path, apiserver_port: int) -> Net:
        digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()
        ident = digest[:8]
        taken = _octets_in_use()
        # 10.100-189.x.x: clear of the Service range 10.96.0.0/16 and of each other.
        start = int(digest[8:16], 16)
        free = [100 + (start + i) % 90 for i in range(90) if 100 + (start + i) % 90 not in taken]
        if not free:
            raise NodeError("no free 10.<100-189>.0.0/16 range for the node's network: remove stale routes")
        octet = free[0]
        return cls(id=ident, state=str(state.resolve()), octet=octet, apiserver_port=apiserver_port)

    @property
    def netns(self) -> str:
        return f"kaos-{self.id}"

    @property
    def host_if(self) -> str:
        return f"kh-{self.id}"

    @property
    def node_if(self) -> str:
        return f"kn-{self.id}"

    @property
    def host_ip(self) -> str:
        return f"10.{self.octet}.255.1"

    @property
    def node_ip(self) -> str:
        return f"10.{self.octet}.255.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.octet}.0.0/24"

    @property
    def cgroup(self) -> str:
        return f"kaos-{self.id}"

    @property
    def dir(self) -> Path:
        return Path(self.state) / "node"

    @property
    def record(self) -> Path:
        return RECORDS / f"{self.id}.json"

    def save(self) -> None:
        RECORDS.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps(asdict(self)))


def _octets_in_use() -> set[int]:
    taken = set()
    for rec in RECORDS.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            taken.add(int(json.loads(rec.read_text())["octet"]))
    routes = run("ip", "-4", "route", "show", check=False).stdout
    taken |= {int(m) for m in re.findall(r"\b10\.(\d+)\.", routes)}
    return taken


def records() -> list[Net]:
    nets = []
    for rec in RECORDS.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            nets.append(Net(**json.loads(rec.read_text())))
    return nets


def record_for(state: Path) -> Net | None:
    state = state.resolve()
    return next((n for n in records() if Path(n.state) == state), None)


# ---------------------------------------------------------------------------------- preflight


def missing_packages() -> list[str]:
    missing = []
    for pkg in DEBIAN_PACKAGES:
        out = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False).stdout
        if "install ok installed" not in out:
            missing.append(pkg)
    return missing


def install_packages() -> None:
    """`make deps`: apt-get install the Debian packages the node needs, when some are missing."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        print(f"note: the real node needs root and the Debian packages {' '.join(missing)}; "
              "without them only the stand-in node runs", file=sys.stderr)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


def check_host() -> None:
    """Say what is missing for a real node, in one line."""
    if os.geteuid() != 0:
        raise NodeError("the real node needs root (containers, network and mount namespaces): run as root, "
                        "or without it (KAOS_REAL_NODE=0)")
    missing = missing_packages()
    if missing:
        raise NodeError(f"the real node needs the Debian packages {' '.join(missing)}: run `make deps` as root")


# ------------------------------------------------------------------------------ builds, images


def _go_build(src: Path, name: str, log_fn: Callable[[str], None]) -> Path:
    """Build the Go module in src into the cache, keyed by its go.mod, go.sum and .go files."""
    root = cluster.cache_root().parent / name
    target = root / cluster.source_key(src) / name
    if target.exists():
        return target
    return buildcache.build_once(target, lambda tmp: _go_build_into(src, name, tmp, log_fn), log_fn)


def _go_build_into(src: Path, name: str, tmp: Path, log_fn: Callable[[str], None]) -> None:
    log_fn(f"building {name} from {src.relative_to(cluster.REPO)} ...")
    began = time.monotonic()
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    build_log = tmp.parent / "build.log"
    with open(build_log, "w") as out:
        code = subprocess.call(
            ["go", "build", f"-p={os.environ.get('KAOS_BUILD_JOBS', '2')}", "-trimpath", "-buildvcs=false",
             "-ldflags", "-s -w", "-o", str(tmp), "."],
            cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise NodeError(f"{name} did not build: see {build_log}")
    log_fn(f"built {tmp.parent} in {time.monotonic() - began:.0f} s")


def coredns_binary(log_fn: Callable[[str], None] = cluster.say) -> Path:
    return _go_build(HERE / "coredns", "kaos-coredns", log_fn)


def _image_key(*parts: Path) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _buildah_archive(name: str, files: dict[str, Path], entrypoint: list[str], archive: Path) -> None:
    """An image of just `files` (path in image -> file here), saved as a docker-archive named `name`."""
    ctr = run("buildah", "from", "scratch").stdout.strip()
    try:
        for dest, src in files.items():
            run("buildah", "copy", "--chmod", "0755", ctr, str(src), dest)
        run("buildah", "config", "--entrypoint", json.dumps(entrypoint), "--cmd", "", ctr)
        tmp = archive.with_name(f".{archive.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        run("buildah", "commit", "--quiet", "--rm", ctr, f"docker-archive:{tmp}:{name}")
        tmp.rename(archive)
    finally:
        run("buildah", "rm", ctr, check=False)


def pause_image(log_fn: Callable[[str], None] = cluster.say) -> tuple[str, Path]:
    """The sandbox image (static C, e2e/node/pause.c): (name, docker-archive path), cached."""
    src = HERE / "node" / "pause.c"
    key = _image_key(src)
    name = f"localhost/kaos-pause:{key}"
    archive = cluster.cache_root().parent / "node-images" / f"pause-{key}.tar"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        binary = archive.with_suffix(".bin")
        run("gcc", "-static", "-O2", "-Wall", "-o", str(binary), str(src))
        _buildah_archive(name, {"/pause": binary}, ["/pause"], archive)
        binary.unlink()
        log_fn(f"built {name}")
    return name, archive


def test_image(log_fn: Callable[[str], None] = cluster.say) -> tuple[str, Path]:
    """The tests' image: e2e/node/testbin (static Go) as /testbin: (name, docker-archive path), cached."""
    src = HERE / "node" / "testbin"
    key = cluster.source_key(src)[:16]
    name = f"localhost/kaos-testbin:{key}"
    archive = cluster.cache_root().parent / "node-images" / f"testbin-{key}.tar"
    if not archive.exists():
        binary = _go_build(src, "kaos-testbin", log_fn)
        _buildah_archive(name, {"/testbin": binary}, ["/testbin"], archive)
        log_fn(f"built {name}")
    return name, archive


def normalize(name: str) -> str:
    """The reference containerd stores for an image name as a pod spec writes it."""
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        name = f"docker.io/{name if rest else 'library/' + name}"
    if ":" not in name.rsplit("/", 1)[-1] and "@" not in name:
        name += ":latest"
    return name


def import_image(state: Path, archive: Path, name: str) -> str:
    """Import a docker-archive or OCI archive into the node's containerd under exactly `name`.

    The kubelet asks for images by name and the node never pulls: a pod whose image was not
    imported fails with ErrImagePull naming it.
    """
    sock = state.resolve() / "node" / "containerd.sock"
    ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io", "images"]
    want = normalize(name)
    out = run(*ctr, "import", str(archive)).stdout
    imported = re.findall(r"unpacking (\S+) \(", out)
    if want in imported:
        return want
    if imported:  # named otherwise in the archive
        run(*ctr, "tag", "--force", imported[0], want)
    else:  # an OCI archive whose index names no image: keep the index under the name
        run(*ctr, "import", "--index-name", want, str(archive))
    return want


# --------------------------------------------------------------------------------- the API


def _api(state: Path, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
    pki = state / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    data = json.dumps(body).encode() if body is not None else None
    ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
    req = urllib.request.Request(cluster.server_of(state / "kubeconfig") + path, data=data, method=method,
                                 headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _apply(state: Path, path: str, obj: dict[str, Any]) -> None:
    """Create obj at the collection path, or replace it if it exists."""
    try:
        _api(state, "POST", path, obj)
    except urllib.error.HTTPError as err:
        if err.code != 409:
            raise
        name = obj["metadata"]["name"]
        current = _api(state, "GET", f"{path}/{name}")
        obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        _api(state, "PUT", f"{path}/{name}", obj)


def _publish_endpoints(state: Path, net: Net) -> None:
    """kube-dns (CoreDNS on the node's address) and the `kubernetes` Service's endpoint (the forwarder)."""
    dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    _apply(state, "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"clusterIP": CLUSTER_DNS, "ports": [{**p, "targetPort": 53} for p in dns_ports]},
    })
    for ns, svc, address, ports in [
        ("kube-system", "kube-dns", net.node_ip, dns_ports),
        ("default", "kubernetes", net.host_ip, [{"name": "https", "port": net.apiserver_port, "protocol": "TCP"}]),
    ]:
        _apply(state, f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-{NODE_NAME}", "namespace": ns, "labels": {
                "kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "kaos.tools-node"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": ports,
        })


def node_ready(state: Path) -> bool:
    try:
        node = _api(state, "GET", f"/api/v1/nodes/{NODE_NAME}", timeout=5)
    except (urllib.error.URLError, OSError):
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))


STAND_IN_NODE = "kaos-node"
# `make dev` taints the stand-in with this, so that pods that do not tolerate it run on the real node.
STAND_IN_TAINT = "kaos.tools/stand-in"
DEV_MARK = "dev-mode"  # a file in the state folder: the cluster runs its pods on the real node (make_default)


def make_default(state: Path) -> None:
    """Make the real node where pods go by default (`make dev`): lift its taint and taint the stand-in
    instead, so that pods written without any nodeSelector or toleration (the samples) run as containers.
    A pod can still go to the stand-in by tolerating `kaos.tools/stand-in`."""
    _api(state, "PATCH", f"/api/v1/nodes/{NODE_NAME}", {"spec": {"taints": None}})
    _api(state, "PATCH", f"/api/v1/nodes/{STAND_IN_NODE}", {"spec": {"taints": [
        {"key": STAND_IN_TAINT, "value": "true", "effect": "NoSchedule"}]}})
    (state / DEV_MARK).touch()


def is_default(state: Path) -> bool:
    return (state / DEV_MARK).exists()


def import_all_images(state: Path, log_fn: Callable[[str], None] = cluster.say) -> dict[str, str]:
    """Every image of e2e/images.py (built unless cached) imported into the node under its exact ref."""
    from e2e import images

    imported = {}
    for ref in images.images():
        imported[ref] = import_image(state, images.build(ref), ref)
        log_fn(f"image {ref} imported into {NODE_NAME}")
    return imported


# ------------------------------------------------------------------------------- configuration


def _write_config(net: Net, binary: Path, coredns: Path, gateway: Path, pause: str) -> None:
    d = net.dir
    state = Path(net.state)
    pki = state / "pki"
    for sub in ("cni", "kubelet", "pod-logs", "containerd"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    # The node's client identity is the admin's (no node authorizer here, see e2e/README.md); it
    # reaches the apiserver through the forwarder, whose certificate names localhost.
    (d / "kubeconfig").write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: kaos
  cluster: {{server: "https://{net.host_ip}:{net.apiserver_port}", certificate-authority: "{pki}/ca.crt",
    tls-server-name: localhost}}
users:
- name: node
  user: {{client-certificate: "{pki}/admin.crt", client-key: "{pki}/admin.key"}}
contexts:
- name: kaos
  context: {{cluster: kaos, user: node}}
current-context: kaos
""")
    run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(d / "kubelet.key"), "-out", str(d / "kubelet.csr"), "-subj", f"/CN={NODE_NAME}")
    (d / "kubelet.ext").write_text(f"subjectAltName=IP:{net.node_ip},DNS:{NODE_NAME}\n"
                                   "extendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(d / "kubelet.csr"), "-CA", str(pki / "ca.crt"), "-CAkey",
        str(pki / "ca.key"), "-CAcreateserial", "-days", "30", "-extfile", str(d / "kubelet.ext"),
        "-out", str(d / "kubelet.crt"))
    (d / "containerd.toml").write_text(f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # runc cannot set oom_score_adj below the container's own here (measured): never ask it to.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
""")
    (d / "cni" / "10-kaos.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "kaos",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": net.pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=1))
    (d / "resolv.conf").write_text("")  # pods with dnsPolicy Default get no host resolver: there is no way out
    (d / "kubelet.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false          # this host mounts cgroup v1 controllers (hybrid)
cgroupDriver: cgroupfs
cgroupRoot: /{net.cgroup}
failSwapOn: false
containerRuntimeEndpoint: unix://{d}/containerd.sock
address: {net.node_ip}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: {d}/kubelet.crt
tlsPrivateKeyFile: {d}/kubelet.key
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {pki}/ca.crt}}
authorization: {{mode: Webhook}}
clusterDomain: {CLUSTER_DOMAIN}
clusterDNS: [{CLUSTER_DNS}]
resolvConf: {d}/resolv.conf
podLogsDir: {d}/pod-logs
registerWithTaints:
- {{key: {NODE_LABEL}, value: "true", effect: NoSchedule}}
# Images are imported, never pulled: never collect them, and never evict for a full-ish disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
serializeImagePulls: false
syncFrequency: 10s
""")
    (d / "kube-proxy.yaml").write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {d}/kubeconfig}}
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {net.pod_cidr}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# nf_conntrack_max is machine-global: leave it alone.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
    (d / "Corefile").write_text(f""".:53 {{
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {d}/kubeconfig kaos
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
""")
    (d / "traefik.yaml").write_text(traefik.static_config(net.node_ip))  # JSON, which is YAML
    (d / "binaries.json").write_text(json.dumps({"controlplane": str(binary), "coredns": str(coredns),
                                                 "traefik": str(gateway)}))


# ------------------------------------------------------------------------------- start / stop


def start(state: Path, apiserver_port: int, log_fn: Callable[[str], None] = cluster.say,
          timeout: float = START_TIMEOUT) -> Net:
    """Add the real node to the running control plane of `state`; return once the node is Ready."""
    check_host()
    state = state.resolve()
    sweep()
    binary = cluster.build(log=log_fn)
    coredns = coredns_binary(log_fn)
    gateway = traefik.binary(log_fn)
    pause, pause_archive = pause_image(log_fn)
    test, test_archive = test_image(log_fn)
    net = Net.derive(state, apiserver_port)
    net.save()  # before anything exists, so that a crash from here on is swept
    try:
        _write_config(net, binary, coredns, gateway, pause)
        _make_network(net)
        _make_cgroup(net)
        (net.dir / "logs").mkdir(exist_ok=True)
        with open(net.dir / "logs" / "node.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "host", str(state)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
                                    start_new_session=True)
        net.host_pid = proc.pid
        net.save()
        _wait(lambda: (net.dir / "containerd.sock").exists() and _containerd_up(net), timeout, "containerd", proc, net)
        for name, archive in ((pause, pause_archive), (test, test_archive)):
            import_image(state, archive, name)
        (net.dir / "images-imported").touch()  # the kubelet starts only now: the sandbox image is there
        _publish_endpoints(state, net)
        _wait(lambda: node_ready(state), timeout, f"node {NODE_NAME} to be Ready", proc, net)
        # The node lifecycle controller would lift the not-ready taint that admission gave the new node;
        # it does not run here (it would evict the stand-in's pods: the stand-in sends no heartbeats).
        _api(state, "PATCH", f"/api/v1/nodes/{NODE_NAME}", {"spec": {"taints": [
            {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]}})
        for path, obj in traefik.gateway_objects():  # the Gateway the operator's HTTPRoutes attach to
            _apply(state, path, obj)
    except BaseException:
        stop(state)
        raise
    return net


def _containerd_up(net: Net) -> bool:
    return run("ctr", "--address", str(net.dir / "containerd.sock"), "version", check=False).returncode == 0


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes], net: Net) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise NodeError(f"the real node exited while waiting for {what}: see {net.dir / 'logs'}")
        if time.monotonic() > deadline:
            raise NodeError(f"timed out waiting for {what}: see {net.dir / 'logs'}")
        time.sleep(0.2)


def _make_network(net: Net) -> None:
    run("ip", "netns", "add", net.netns)
    run("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", net.node_if, "netns", net.netns)
    run("ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if)
    run("ip", "link", "set", net.host_if, "up")
    # Pods are reachable from the host (curl a pod IP), through the node.
    run("ip", "route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.host_if, "onlink")
    inside = ["ip", "netns", "exec", net.netns]
    run(*inside, "ip", "addr", "add", f"{net.node_ip}/30", "dev", net.node_if)
    run(*inside, "ip", "link", "set", net.node_if, "up")
    run(*inside, "ip", "link", "set", "lo", "up")
    # Per network namespace: forwarding between the bridge and the veth, and Services (kube-proxy's
    # DNAT) for pods talking across the bridge. No default route: nothing leaves the machine.
    for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1",
                "net.bridge.bridge-nf-call-ip6tables=1"):
        run(*inside, "sysctl", "-qw", key)
    _route_services(inside)


def _route_services(inside: list[str]) -> None:
    """Route the Service range inside the node's namespace, into a sink, as a real node routes it (its default
    route): a packet to a ClusterIP that kube-proxy does not DNAT (a Service without endpoints, or rules not yet
    written) must reach the FORWARD chain, where kube-proxy REJECTs it (a client sees ECONNREFUSED) or, between
    kube-proxy's filter and nat commits, goes on and is lost (the client's TCP sends its SYN again). Without a
    route the lookup fails first: the node answers ICMP net-unreachable and a client's connect() fails with
    ENETUNREACH at once, where a real node's client would be refused or retransmit. The sink is a bridge with no
    ports and no ARP: what reaches it is dropped, so nothing leaves the namespace (the Service range is never
    routed to the host)."""
    run(*inside, "ip", "link", "add", SERVICE_SINK, "type", "bridge")
    run(*inside, "ip", "link", "set", SERVICE_SINK, "arp", "off", "up")
    run(*inside, "ip", "route", "add", SERVICE_CIDR, "dev", SERVICE_SINK)


def _cgroup_dirs(net: Net) -> list[Path]:
    return [h / net.cgroup for h in CGROUPS.iterdir() if (h / "cgroup.procs").exists()]


def _make_cgroup(net: Net) -> None:
    for d in _cgroup_dirs(net):
        d.mkdir(exist_ok=True)
        if d.parent.name == "cpuset":  # a v1 cpuset starts empty: nothing could run in it
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((d.parent / f).read_text())


def stop(state: Path, timeout: float = 60.0) -> bool:
    """Stop the real node of `state` (if any) and remove all of it. True if one was there."""
    net = record_for(state)
    if net is None:
        return False
    if net.host_pid and _pid_alive(net.host_pid):
        os.kill(net.host_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(net.host_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    _remove_all(net)
    return True


def sweep() -> None:
    """Remove every node whose host process is gone (a crashed session, a killed `make cluster`)."""
    for net in records():
        if _abandoned(net):
            _remove_all(net)


def _abandoned(net: Net) -> bool:
    if net.host_pid:
        return not (_pid_alive(net.host_pid) and " host " in _cmdline(net.host_pid))
    # Still starting (no host process yet): abandoned if its control plane is gone.
    cp = cluster.read_pid(Path(net.state))
    return cp is None or not _pid_alive(cp)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _cgroup_pids(net: Net) -> set[int]:
    pids = set()
    for d in _cgroup_dirs(net):
        for procs in d.rglob("cgroup.procs") if d.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _kill_cgroup(net: Net, timeout: float = 20.0) -> None:
    """SIGKILL every process under the node's cgroup (containers, shims, daemons) until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := _cgroup_pids(net) - {os.getpid()}) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_cgroups(net: Net) -> None:
    for top in _cgroup_dirs(net):
        if not top.exists():
            continue
        for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _remove_all(net: Net) -> None:
    """What is left of a node after its processes: processes, cgroups, the network namespace, the record."""
    _kill_cgroup(net)
    _remove_cgroups(net)
    if Path(f"/run/netns/{net.netns}").exists():
        run("ip", "netns", "delete", net.netns, check=False)
    run("ip", "link", "delete", net.host_if, check=False)  # gone with the namespace; a half start may leave it
    if not Path(net.state, "pid").exists():  # the control plane removed (or never made) its state
        shutil.rmtree(net.dir, ignore_errors=True)
    net.record.unlink(missing_ok=True)


# -------------------------------------------------------------------- host process (host netns)


def host_main(state: Path) -> int:
    """Forward the apiserver to the node's namespace; run `inner` there; clean up after it."""
    net = record_for(state)
    if net is None:
        return 1
    cp_pid = cluster.read_pid(state)
    listener = socket.create_server((net.host_ip, net.apiserver_port), reuse_port=False)
    threading.Thread(target=_forward_loop, args=(listener, net.apiserver_port), daemon=True).start()
    inner = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{net.netns}", "--", "unshare", "--mount", "--propagation", "private", "--",
         sys.executable, str(Path(__file__).resolve()), "inner", str(state)])
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    while inner.poll() is None:
        if stopping.is_set() or cp_pid is None or not _pid_alive(cp_pid):
            log("stopping the node")
            inner.send_signal(signal.SIGTERM)
            try:
                inner.wait(45)
            except subprocess.TimeoutExpired:
                inner.kill()
            break
        time.sleep(0.2)
    inner.wait()
    listener.close()
    _remove_all(net)
    log("node removed")
    return 0


def _forward_loop(listener: socket.socket, port: int) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_forward, args=(conn, port), daemon=True).start()


def _forward(conn: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
    t.start()
    pipe(conn, upstream)
    t.join()
    conn.close()
    upstream.close()


# --------------------------------------------------------------- inner process (node namespaces)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]


def _spawn(net: Net, name: str, *cmd: str, env: dict[str, str] | None = None) -> Daemon:
    with open(net.dir / "logs" / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=_die_with_parent, env={**os.environ, **(env or {})})
    return Daemon(name, proc)


def _join_cgroup(net: Net, sub: str) -> None:
    for d in _cgroup_dirs(net):
        target = d / sub
        target.mkdir(exist_ok=True)
        if d.parent.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (target / f).write_text((d / f).read_text())
        (target / "cgroup.procs").write_text(str(os.getpid()))


def _leave_cgroup(net: Net) -> None:
    for d in _cgroup_dirs(net):
        with contextlib.suppress(OSError):
            (d.parent / "cgroup.procs").write_text(str(os.getpid()))


def inner_main(state: Path) -> int:
    net = record_for(state)
    if net is None:
        return 1
    d = net.dir
    bins = json.loads((d / "binaries.json").read_text())
    # Private to this mount namespace: containerd's and runc's state under /run, the pods' netns
    # files (/run/netns), the CNI plugins' IP allocations and cache (/var/lib/cni).
    for path in ("/run", "/var/lib/cni"):
        Path(path).mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "tmpfs", path)
    _mask_kernel_tunables(net)
    _join_cgroup(net, "node")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    daemons = [_spawn(net, "containerd", "containerd", "--config", str(d / "containerd.toml"))]
    try:
        while not (d / "images-imported").exists():
            if stopping.is_set() or daemons[0].proc.poll() is not None:
                return 1
            time.sleep(0.1)
        binary = bins["controlplane"]
        daemons.append(_spawn(net, "kubelet", binary, "kubelet", f"--config={d}/kubelet.yaml",
                              f"--kubeconfig={d}/kubeconfig", f"--hostname-override={NODE_NAME}",
                              f"--node-ip={net.node_ip}", f"--node-labels={NODE_LABEL}=true",
                              f"--root-dir={d}/kubelet", "--v=1"))
        daemons.append(_spawn(net, "kube-proxy", binary, "kube-proxy", f"--config={d}/kube-proxy.yaml", "--v=1"))
        daemons.append(_spawn(net, "coredns", bins["coredns"], "-conf", str(d / "Corefile")))
        daemons.append(_spawn_gateway(net, bins["traefik"]))
        while not stopping.is_set():
            dead = [x for x in daemons if x.proc.poll() is not None]
            for gateway in [x for x in dead if x.name == "traefik"]:
                # Like a pod's container: restarted, and the node (with its pods) carries on meanwhile.
                log(f"traefik exited ({gateway.proc.returncode}): starting it again")
                daemons[daemons.index(gateway)] = _spawn_gateway(net, bins["traefik"], after=1.0)
            dead = [x for x in dead if x.name != "traefik"]
            if dead:
                log(f"{dead[0].name} exited ({dead[0].proc.returncode}): stopping the node")
                break
            time.sleep(0.2)
    finally:
        _teardown(net, state, daemons)
    return 0


def _spawn_gateway(net: Net, binary: str, after: float = 0.0) -> Daemon:
    """The Gateway API implementation (e2e/traefik.py); its provider finds the API through KUBECONFIG."""
    time.sleep(after)  # a restart: not in a tight loop if it fails at once
    return _spawn(net, "traefik", binary, f"--configFile={net.dir}/traefik.yaml",
                  env={"KUBECONFIG": str(net.dir / "kubeconfig")})


# The values the kubelet insists on (pkg/kubelet/cm setupKernelTunables): it writes them unless it finds
# them, and they are machine-global (kernel.panic_on_oops=1 would change how this whole machine fails).
KUBELET_SYSCTLS = {"vm/overcommit_memory": 1, "vm/panic_on_oom": 0, "kernel/panic": 10, "kernel/panic_on_oops": 1,
                   "kernel/keys/root_maxkeys": 1000000, "kernel/keys/root_maxbytes": 25000000}


def _mask_kernel_tunables(net: Net) -> None:
    """Show the kubelet (only in this mount namespace) the values it wants, so it leaves the real ones alone."""
    masks = net.dir / "sysctl"
    masks.mkdir(exist_ok=True)
    for key, value in KUBELET_SYSCTLS.items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != str(value):
            fake = masks / key.replace("/", ".")
            fake.write_text(f"{value}\n")
            run("mount", "--bind", str(fake), str(path))


def _teardown(net: Net, state: Path, daemons: list[Daemon]) -> None:
    """Pods first (the kubelet kills their containers and unmounts their volumes), then the daemons."""
    by_name = {x.name: x for x in daemons}
    kubelet = by_name.get("kubelet")
    if kubelet and kubelet.proc.poll() is None:
        # (The control plane may be gone already: then the kubelet cannot be told, the cgroup is killed.)
        with contextlib.suppress(urllib.error.URLError, OSError, KeyError, cluster.ClusterError):
            log(f"deleted {_drain(state)} pods; waiting for the kubelet to stop their containers")
            deadline = time.monotonic() + 20
            while _tasks(net) and time.monotonic() < deadline:
                time.sleep(0.2)
    for name in ("kubelet", "kube-proxy", "coredns", "traefik"):
        if name in by_name:
            _stop(by_name[name].proc)
    # Whatever the kubelet did not stop: kill the tasks through containerd, then the daemon.
    for task in _tasks(net):
        log(f"killing task {task}")
        _ctr(net, "tasks", "kill", "--signal", "SIGKILL", task)
    if "containerd" in by_name:
        _stop(by_name["containerd"].proc)
    _leave_cgroup(net)
    _kill_cgroup(net)  # the shims and anything that escaped


def _drain(state: Path) -> int:
    """Cordon the node (no new pods) and delete its pods at once; return how many."""
    _api(state, "PATCH", f"/api/v1/nodes/{NODE_NAME}", {"spec": {"unschedulable": True}}, timeout=5)
    pods = _api(state, "GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE_NAME}", timeout=5)
    for pod in pods["items"]:
        meta = pod["metadata"]
        with contextlib.suppress(urllib.error.HTTPError):
            _api(state, "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                 {"gracePeriodSeconds": 0}, timeout=5)
    return len(pods["items"])


def _ctr(net: Net, *args: str) -> subprocess.CompletedProcess[str]:
    return run("ctr", "--address", str(net.dir / "containerd.sock"), "--namespace", "k8s.io", *args,
               check=False, timeout=10)


def _tasks(net: Net) -> list[str]:
    out = _ctr(net, "tasks", "ls", "-q")
    return out.stdout.split() if out.returncode == 0 else []


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------- leftovers


def leftovers(net: Net) -> list[str]:
    """What of the node `net` still exists on this machine (for the clean-up test)."""
    found = []
    if Path(f"/run/netns/{net.netns}").exists():
        found.append(f"network namespace {net.netns}")
    links = run("ip", "-o", "link", "show", check=False).stdout
    found += [f"link {name}" for name in (net.host_if, net.node_if) if f" {name}@" in links or f" {name}:" in links]
    found += [f"cgroup {d}" for d in _cgroup_dirs(net) if d.exists()]
    found += [f"process {pid}" for pid in _cgroup_pids(net)]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if str(net.dir) in line]
    for pid in _processes_of(net):
        found.append(f"process {pid} ({_cmdline(pid)})")
    if net.record.exists():
        found.append(f"record {net.record}")
    return found


def _processes_of(net: Net) -> Iterator[int]:
    """Processes whose command line names the node's folder (daemons, shims)."""
    for entry in Path("/proc").glob("[0-9]*"):
        args = _cmdline(int(entry.name)).split()
        if int(entry.name) != os.getpid() and any(a == net.state or str(net.dir) in a for a in args):
            yield int(entry.name)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    try:
        if command == "host":
            return host_main(Path(argv[2]))
        if command == "inner":
            return inner_main(Path(argv[2]))
        if command == "deps":
            install_packages()
        elif command == "build":
            if os.geteuid() == 0 and not missing_packages():
                coredns_binary()
                traefik.binary()
                pause_image()
                test_image()
        elif command == "sweep":
            sweep()
        else:
            print(f"usage: {argv[0]} deps|build|sweep", file=sys.stderr)
            return 2
    except cluster.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
