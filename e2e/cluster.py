"""Build, start, stop and wait for the local Kubernetes control plane (e2e/controlplane).

As a script (the Makefile's `controlplane`, `cluster` and `cluster-down` targets):

    python e2e/cluster.py build   # build the binary unless it is cached; print its path
    python e2e/cluster.py up      # start it in the background; kubeconfig in the state folder
    python e2e/cluster.py dev     # up, then (with a real node) import the images and make pods run there
    python e2e/cluster.py down    # stop it and remove the state folder
    python e2e/cluster.py status

As a library (conftest.py): build(), start(), stop(), is_running(), wait_ready(), eventually().

Settings, from the environment:
    KAOS_CLUSTER_DIR        state folder of `up`/`down` (default: <repo>/.cluster)
    KAOS_APISERVER_PORT     kube-apiserver HTTPS port on 127.0.0.1 (default 26443)
    KAOS_ETCD_PORT          etcd client port (default 26379)
    KAOS_ETCD_PEER_PORT     etcd peer port (default 26380)
    KAOS_CONTROLPLANE_SRC   Go sources to build (default: e2e/controlplane)
    KAOS_CACHE_DIR          binary cache (default: $XDG_CACHE_HOME or ~/.cache, /kaos-modelapi/controlplane)
    KAOS_BUILD_JOBS         parallel compile jobs of a cold build (default 2)
    KAOS_REAL_NODE          `up` adds the real node (e2e/node.py): 1 yes, 0 no, default: yes when
                            running as root with the node's Debian packages installed

The standard library only, so that `make cluster` works before the project's venv exists.
Every failure is a ClusterError whose message is one line that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python e2e/cluster.py ...
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.buildcache import build_once

REPO = Path(__file__).resolve().parent.parent
BINARY_NAME = "kaos-controlplane"
START_TIMEOUT = 240.0  # the binary gives up after 180 s; this is the backstop
STOP_TIMEOUT = 60.0


def say(message: str) -> None:
    print(message, flush=True)  # before any error line on stderr


class ClusterError(Exception):
    """A failure to build, start or stop the control plane; str() is one line saying what to do."""


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def source_dir() -> Path:
    return _env_path("KAOS_CONTROLPLANE_SRC", REPO / "e2e" / "controlplane")


def state_dir() -> Path:
    return _env_path("KAOS_CLUSTER_DIR", REPO / ".cluster")


def cache_root() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return _env_path("KAOS_CACHE_DIR", xdg / "kaos-modelapi" / "controlplane")


def default_ports() -> dict[str, int]:
    return {
        "apiserver": int(os.environ.get("KAOS_APISERVER_PORT", "26443")),
        "etcd": int(os.environ.get("KAOS_ETCD_PORT", "26379")),
        "etcd-peer": int(os.environ.get("KAOS_ETCD_PEER_PORT", "26380")),
    }


def free_ports() -> dict[str, int]:
    """Three ports that are free now, for a private control plane (e.g. one per test session)."""
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    return dict(zip(["apiserver", "etcd", "etcd-peer"], ports, strict=True))


# ---------------------------------------------------------------------------------------- build


def source_key(src: Path | None = None) -> str:
    """sha256 of go.mod, go.sum and the .go files: the binary's cache key."""
    src = src or source_dir()
    h = hashlib.sha256()
    for path in sorted([src / "go.mod", src / "go.sum", *src.glob("*.go")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def binary_path(src: Path | None = None) -> Path:
    return cache_root() / source_key(src) / BINARY_NAME


def kubernetes_version(src: Path | None = None) -> str:
    """The k8s.io/kubernetes version pinned in go.mod, e.g. v1.37.2."""
    gomod = ((src or source_dir()) / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", gomod, re.M)
    if not match:
        raise ClusterError("e2e/controlplane/go.mod does not require k8s.io/kubernetes")
    return match.group(1)


def build(src: Path | None = None, log: Callable[[str], None] = say) -> Path:
    """Build the binary unless the cache has it for these sources; return its path."""
    src = src or source_dir()
    target = binary_path(src)
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise ClusterError("`go` is not on PATH: install Go 1.26 (the control plane is built from source)")
    return build_once(target, lambda tmp: _build_into(go, src, tmp, log), log)


def _build_into(go: str, src: Path, tmp: Path, log: Callable[[str], None]) -> None:
    version = kubernetes_version(src)
    major, minor = version.lstrip("v").split(".")[:2]
    build_log = tmp.parent / "build.log"
    # -p bounds the parallel compiles (each big k8s package takes 1-2 GB); the link is the
    # peak, about 3 GB. -s -w drops the symbol tables: a smaller binary and a faster link.
    ldflags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
    jobs = os.environ.get("KAOS_BUILD_JOBS", "2")
    steps = [
        [go, "generate", "."],
        [go, "build", f"-p={jobs}", "-trimpath", "-buildvcs=false", "-ldflags", " ".join(ldflags), "-o", str(tmp), "."],
    ]
    log(f"building the control plane (Kubernetes {version}); a cold build takes several minutes ...")
    began = time.monotonic()
    with open(build_log, "w") as out:
        for step in steps:
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            code = subprocess.call(step, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
            if code != 0:
                raise ClusterError(
                    f"the control plane did not build ({_first_error(build_log)}): fix the sources in {src} "
                    f"and run `make controlplane` again; full output in {build_log}"
                )
    log(f"built {tmp.parent} in {time.monotonic() - began:.0f} s")


def _first_error(build_log: Path) -> str:
    lines = [ln.strip() for ln in build_log.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("$ ", "go: downloading", "#"))]
    errors = [ln for ln in lines if re.search(r"\.go:\d+|error|cannot|undefined", ln, re.I)]
    return (errors or lines or ["no output"])[0]


# ---------------------------------------------------------------------------------- start/stop


@dataclass
class Cluster:
    state_dir: Path
    pid: int
    apiserver_port: int
    proc: subprocess.Popen[bytes] | None = None  # set when this process started it

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


def start(
    state: Path | None = None,
    ports: dict[str, int] | None = None,
    *,
    exit_with_parent: bool = False,
    timeout: float = START_TIMEOUT,
    log: Callable[[str], None] = say,
    real_node: bool = False,
    restart: bool = False,
) -> Cluster:
    """Start a control plane in the background with its state in `state`; return once it is ready.

    With exit_with_parent it stops by itself when this process exits (for test sessions). With
    real_node it also gets a real node (e2e/node.py) beside the stand-in, and the real
    kube-scheduler. With restart it starts again on the etcd data and certificates of a control plane
    that was stopped or killed in `state` (as after a crash). On failure nothing is left running and a
    ClusterError says why.
    """
    state = (state or state_dir()).resolve()
    ports = ports or default_ports()
    binary = build(log=log)
    cmd = [
        str(binary),
        f"--state-dir={state}",
        f"--apiserver-port={ports['apiserver']}",
        f"--etcd-port={ports['etcd']}",
        f"--etcd-peer-port={ports['etcd-peer']}",
    ]
    if exit_with_parent:
        cmd.append("--exit-with-parent")
    if restart:
        cmd.append("--restart")
    if real_node:
        from e2e import node

        node.check_host()  # before anything starts: say what is missing
        cmd.append("--real-node")
    # Its own session: a Ctrl-C in the terminal that ran `make cluster` does not reach it, and
    # the whole tree can be signalled as one process group.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        outcome = _read_outcome(proc, timeout)
    except BaseException:  # e.g. Ctrl-C during `make cluster`: leave nothing half-started
        _kill_group(proc.pid, proc)
        for name in ("pid", "kubeconfig", "pki", "etcd"):
            _remove(state / name)
        raise
    if outcome.startswith("ready:") and proc.poll() is None:
        started = Cluster(state_dir=state, pid=proc.pid, apiserver_port=ports["apiserver"], proc=proc)
        if real_node:
            _add_real_node(started, log)
        return started
    _kill_group(proc.pid, proc)
    if outcome.startswith("error:"):
        raise ClusterError(outcome.removeprefix("error:").strip())
    for name in ("pid", "kubeconfig", "pki", "etcd"):  # what a half start leaves; keep the logs
        _remove(state / name)
    if outcome == "timeout":
        raise ClusterError(f"the control plane did not start within {timeout:.0f} s: see the logs in {state / 'logs'}")
    raise ClusterError(
        f"the control plane exited during start (code {proc.returncode}): see the logs in {state / 'logs'}"
    )


def _add_real_node(started: Cluster, log: Callable[[str], None]) -> None:
    from e2e import node

    try:
        node.start(started.state_dir, started.apiserver_port, log_fn=log)
    except BaseException:
        stop(cluster=started)
        raise


def _read_outcome(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait for the binary's one-line outcome on stderr ("ready: ..." / "error: ..."), EOF or timeout."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if sel.select(remaining):
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
    proc.stderr.close()
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(("ready:", "error:")):
            return line
    return lines[-1] if lines else "exited"


def read_pid(state: Path) -> int | None:
    try:
        return int((state / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether pid is a live (not zombie) kaos-controlplane process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours: reap it
        return False
    return BINARY_NAME.encode() in cmdline


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members may be zombies only (the group leader not reaped yet): look for a live one.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_group(pgid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    _wait(lambda: not _group_alive(pgid), 10)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def stop(state: Path | None = None, cluster: Cluster | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the control plane whose state is in `state` and remove the folder. True if one was running."""
    state = (state or (cluster.state_dir if cluster else state_dir())).resolve()
    pid = cluster.pid if cluster else read_pid(state)
    proc = cluster.proc if cluster else None
    from e2e import node

    node.stop(state)  # pods and the node's processes go first, while the apiserver still answers
    was_running = pid is not None and _alive(pid)
    if pid is not None and was_running:
        os.kill(pid, signal.SIGTERM)  # an orderly stop: controllers, apiserver, then etcd
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        if not _wait(lambda: not _alive(pid), timeout):
            _kill_group(pid, proc)
        # The children die with the supervisor (Pdeathsig); make sure of it. (Only for a process
        # seen alive above: the pid of a long-dead one may have been reused by now.)
        if not _wait(lambda: not _group_alive(pid), 10):
            _kill_group(pid)
    if state.exists():
        _remove(state)
    return was_running


def is_running(state: Path | None = None) -> bool:
    """Whether a control plane started from `state` is running and has written its kubeconfig."""
    state = (state or state_dir()).resolve()
    pid = read_pid(state)
    return pid is not None and _alive(pid) and (state / "kubeconfig").exists()


def server_of(kubeconfig: Path) -> str:
    match = re.search(r"^\s*server:\s*(\S+)", kubeconfig.read_text(), re.M)
    if not match:
        raise ClusterError(f"{kubeconfig} names no server")
    return match.group(1)


def readyz(state: Path | None = None, timeout: float = 5.0) -> str:
    """GET /readyz from the control plane of `state` with its admin certificate."""
    state = (state or state_dir()).resolve()
    pki = state / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    url = server_of(state / "kubeconfig") + "/readyz"
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body.decode()


def wait_ready(state: Path | None = None, timeout: float = 60.0) -> None:
    """Wait until the apiserver of `state` answers /readyz with ok."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if readyz(state) == "ok":
                return
        except (OSError, ssl.SSLError) as err:
            last = err
        time.sleep(0.2)
    raise ClusterError(f"the control plane is not ready after {timeout:.0f} s ({last}): see its logs")


async def eventually(
    check: Callable[[], Awaitable[Any]],
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str = "condition",
) -> Any:
    """Await check() until it returns something truthy, or fail after timeout with its last result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
        except AssertionError as err:
            last = err
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "status"
    state = state_dir()
    try:
        if command == "build":
            print(build())
        elif command == "up":
            up(state)
        elif command == "dev":
            up(state)
            dev_node(state)
        elif command == "down":
            print("control plane stopped" if stop(state) else "no control plane was running")
            from e2e import images, node

            node.sweep()  # and any real node whose session crashed
            images.tidy()  # and what an image build stopped midway left mounted
        elif command == "status":
            if is_running(state):
                print(f"running (pid {read_pid(state)}): export KUBECONFIG={state / 'kubeconfig'}")
            else:
                print("not running")
                return 1
        else:
            print(f"usage: {argv[0]} build|up|dev|down|status", file=sys.stderr)
            return 2
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def up(state: Path) -> None:
    if is_running(state):
        print(f"the control plane is already running: export KUBECONFIG={state / 'kubeconfig'}")
        return
    began = time.monotonic()
    real_node = want_real_node()
    cluster = start(state, real_node=real_node)
    nodes = "the stand-in node and the real node kaos-real-node" if real_node else "the stand-in node"
    print(
        f"control plane with {nodes} ready in {time.monotonic() - began:.1f} s on {cluster.server} "
        f"(logs: {state / 'logs'}): export KUBECONFIG={cluster.kubeconfig}"
    )


def dev_node(state: Path) -> None:
    """`make dev`: with a real node, pods run there by default (the samples have no nodeSelector) and
    every image they name that e2e/images.py builds is in its containerd; without one, nothing changes."""
    from e2e import node

    if node.record_for(state) is None:
        print("no real node (KAOS_REAL_NODE=0, or not root, or its packages missing): "
              "the samples' pods go to the stand-in node, which marks them Ready without running them")
        return
    began = time.monotonic()
    node.import_all_images(state)
    node.make_default(state)
    print(f"images imported in {time.monotonic() - began:.1f} s; pods run on the real node "
          f"{node.NODE_NAME} by default (the stand-in is tainted {node.STAND_IN_TAINT})")


def want_real_node() -> bool:
    """KAOS_REAL_NODE: 1 or 0; unset: a real node when this machine can run one (root, packages)."""
    value = os.environ.get("KAOS_REAL_NODE", "")
    if value in ("0", "1"):
        return value == "1"
    from e2e import node

    return os.geteuid() == 0 and not node.missing_packages()


if __name__ == "__main__":
    # As e2e.cluster, so that e2e.node (which imports it) shares its classes.
    sys.path.insert(0, str(REPO))
    from e2e import cluster as _module

    sys.exit(_module.main(sys.argv))
