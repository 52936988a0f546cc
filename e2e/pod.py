"""Run one container of a rendered pod as a local process, the way a kubelet would start it.

The cluster used in e2e runs no containers, so the data path is proven by running the real programs
(LiteLLM from e2e/.venv-litellm, /bin/sh, stand-in commands) with exactly what the operator rendered:
- command + args, with the kubelet's $(VAR) expansion ($$ escapes, unknown names stay literal);
- env: envFrom, then env in order; valueFrom secretKeyRef / configMapKeyRef / fieldRef resolved from the
  given objects, `optional` honoured, a missing required reference is an error (CreateContainerConfigError);
- volumes (configMap and secret with items or all keys, emptyDir) materialized under a temp dir, shared
  by all containers of the pod, and every volumeMount's mountPath rewritten to that dir wherever it
  appears as a path prefix in command, args and env values;
- container ports: every process binds loopback ports the kernel picked instead of its containerPort
  (a local stand-in for the pod's own IP); an argument equal to a containerPort is rewritten to it;
- no environment leaks in from the test process: only PATH (the litellm venv's bin, plus stand-in dirs
  when asked), HOME and LANG, as an image would set them;
- a container without `command` runs its image's entrypoint, when the test says what that image's
  config holds (`Image`: entrypoint, cmd, env, home), as a container runtime reads it from the image: `args`
  replace cmd, the image's env comes first and the container's env overrides it, and a volume mounted
  under the image user's home is linked into the local HOME at the same relative path;
- an env value that is an address with a port of the pod (`0.0.0.0:11434`, `:11434`) is rewritten to the
  loopback port standing in for it, in every container of the pod, since they share one network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

E2E_DIR = Path(__file__).resolve().parent
LITELLM_BIN = E2E_DIR / ".venv-litellm" / "bin"
STANDINS_DIR = E2E_DIR / "standins"
SYSTEM_PATH = ("/usr/local/bin", "/usr/bin", "/bin")

Obj = dict[str, Any]
T = TypeVar("T")


class PodError(Exception):
    """What a kubelet would refuse to start (a missing Secret, an unsupported volume...)."""


@dataclass(frozen=True)
class Image:
    """What a runtime takes from an image's config for a container that does not override it."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    home: str = "/root"  # the image's user's home directory


# --- waiting ---------------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll `check` until it returns something other than None/False, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- $(VAR) expansion, as the kubelet does it -------------------------------------------------------------


def expand(text: str, variables: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if ch == "$" and nxt == "$":
            out.append("$")
            i += 2
        elif ch == "$" and nxt == "(":
            end = text.find(")", i + 2)
            name = text[i + 2 : end] if end != -1 else ""
            if end == -1 or not name:
                out.append(text[i:] if end == -1 else text[i : end + 1])
                i = len(text) if end == -1 else end + 1
            else:
                out.append(variables.get(name, text[i : end + 1]))
                i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# --- object lookup -----------------------------------------------------------------------------------------


def _data(obj: Obj) -> dict[str, bytes]:
    """A ConfigMap's or Secret's content as bytes (Secret data is base64, stringData and ConfigMap data are
    text, binaryData is base64)."""
    decoded: dict[str, bytes] = {}
    if obj["kind"] == "Secret":
        decoded |= {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        decoded |= {k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
    else:
        decoded |= {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        decoded |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    return decoded


@dataclass(frozen=True)
class Objects:
    by_kind_name: dict[tuple[str, str], Obj]

    @classmethod
    def of(cls, objects: Iterable[Obj]) -> Objects:
        return cls({(o["kind"], o["metadata"]["name"]): o for o in objects})

    def get(self, kind: str, name: str) -> Obj | None:
        return self.by_kind_name.get((kind, name))

    def data(self, kind: str, name: str, optional: bool, what: str) -> dict[str, bytes] | None:
        obj = self.get(kind, name)
        if obj is None and not optional:
            raise PodError(f"{what}: {kind} {name!r} not found")
        return None if obj is None else _data(obj)

    def key(self, kind: str, ref: Mapping[str, Any], what: str) -> str | None:
        optional = bool(ref.get("optional", False))
        data = self.data(kind, ref["name"], optional, what)
        if data is None:
            return None
        if ref["key"] not in data:
            if optional:
                return None
            raise PodError(f"{what}: key {ref['key']!r} not found in {kind} {ref['name']!r}")
        return data[ref["key"]].decode()


# --- the pod ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Pod:
    """One replica of a Deployment's pod template, with its volumes under `root`."""

    template: Obj
    objects: Objects
    root: Path
    name: str
    namespace: str
    extra_path: tuple[str, ...] = ()
    images: dict[str, Image] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> loopback port
    mounts_root: Path = field(init=False)

    @classmethod
    def from_objects(
        cls, objects: Iterable[Obj], root: Path, extra_path: Sequence[str | Path] = (),
        images: Mapping[str, Image] | None = None,
    ) -> Pod:
        objs = list(objects)
        deployments = [o for o in objs if o["kind"] == "Deployment"]
        if len(deployments) != 1:
            raise PodError(f"expected one Deployment, got {len(deployments)}")
        deployment = deployments[0]
        meta = deployment["metadata"]
        pod = cls(
            template=deployment["spec"]["template"],
            objects=Objects.of(objs),
            root=root,
            name=f"{meta['name']}-local",
            namespace=meta.get("namespace", "default"),
            extra_path=tuple(str(p) for p in extra_path),
            images=dict(images or {}),
        )
        pod._materialize_volumes()
        return pod

    @property
    def spec(self) -> Obj:
        return dict(self.template["spec"])

    def container(self, name: str) -> Obj:
        for c in [*(self.spec.get("initContainers") or []), *self.spec["containers"]]:
            if c["name"] == name:
                return dict(c)
        raise PodError(f"no container {name!r} in the pod template")

    # volumes

    def _materialize_volumes(self) -> None:
        self.mounts_root = self.root / "volumes"
        for volume in self.spec.get("volumes") or []:
            self._materialize(volume, self.mounts_root / volume["name"])

    def _materialize(self, volume: Obj, target: Path) -> None:
        target.mkdir(parents=True)
        what = f"volume {volume['name']}"
        if "emptyDir" in volume:
            return
        if "configMap" in volume:
            source, kind, name = volume["configMap"], "ConfigMap", volume["configMap"]["name"]
        elif "secret" in volume:
            source, kind, name = volume["secret"], "Secret", volume["secret"]["secretName"]
        else:
            raise PodError(f"{what}: only configMap, secret and emptyDir volumes are supported")
        data = self.objects.data(kind, name, bool(source.get("optional", False)), what)
        for key, path in self._volume_items(source, data or {}, what):
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_bytes((data or {})[key])

    @staticmethod
    def _volume_items(source: Obj, data: dict[str, bytes], what: str) -> list[tuple[str, str]]:
        items = source.get("items")
        if items is None:
            return [(k, k) for k in data]
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing and data and not source.get("optional", False):
            raise PodError(f"{what}: keys {missing} not found")
        return [(i["key"], i["path"]) for i in items if i["key"] in data]

    def _mount_map(self, container: Obj) -> list[tuple[str, Path]]:
        mounts = []
        for m in container.get("volumeMounts") or []:
            local = self.mounts_root / m["name"]
            if not local.exists():
                raise PodError(f"container {container['name']}: volumeMount of unknown volume {m['name']!r}")
            mounts.append((m["mountPath"].rstrip("/"), local / m.get("subPath", "")))
        # Longest first, so /a/b is rewritten before /a.
        return sorted(mounts, key=lambda pair: len(pair[0]), reverse=True)

    def _rewrite_paths(self, text: str, mounts: list[tuple[str, Path]]) -> str:
        """One pass over the text (longest mount path first), so that a rewritten path is never rewritten
        again by a shorter mount path, e.g. /tmp when the local dirs are under /tmp too."""
        if not mounts:
            return text
        local = dict(mounts)
        pattern = "|".join(re.escape(mount_path) for mount_path, _ in mounts)
        return re.sub(f"({pattern})(?=/|$|[\\s:;,'\"])", lambda m: str(local[m.group(1)]), text)

    # env

    def _field(self, ref: Obj) -> str:
        values: dict[str, str] = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": "local",
            "spec.serviceAccountName": str(self.spec.get("serviceAccountName", "default")),
        }
        if ref["fieldPath"] not in values:
            raise PodError(f"fieldRef {ref['fieldPath']!r} is not supported here")
        return values[ref["fieldPath"]]

    def _env_from(self, container: Obj) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else (
                "Secret", source["secretRef"])
            data = self.objects.data(kind, ref["name"], bool(ref.get("optional", False)), "envFrom")
            env |= {prefix + k: v.decode() for k, v in (data or {}).items()}
        return env

    def _env_value(self, var: Obj, env: Mapping[str, str]) -> str | None:
        what = f"env {var['name']}"
        source = var.get("valueFrom")
        if source is None:
            return expand(var.get("value", ""), env)
        if "secretKeyRef" in source:
            return self.objects.key("Secret", source["secretKeyRef"], what)
        if "configMapKeyRef" in source:
            return self.objects.key("ConfigMap", source["configMapKeyRef"], what)
        if "fieldRef" in source:
            return self._field(source["fieldRef"])
        raise PodError(f"{what}: unsupported valueFrom {sorted(source)}")

    def environment(self, name: str) -> dict[str, str]:
        """The container's variables as the kubelet resolves them (without the image's own defaults)."""
        container = self.container(name)
        env = self._env_from(container)
        for var in container.get("env") or []:
            value = self._env_value(var, env)
            if value is not None:
                env[var["name"]] = value
        return env

    # process

    def _host_port(self, container_port: int) -> int:
        if container_port not in self.ports:
            self.ports[container_port] = free_port()
        return self.ports[container_port]

    def _command(self, container: Obj) -> tuple[list[str], Image | None]:
        image = self.images.get(container.get("image", ""))
        if "command" in container:
            return [*container["command"], *(container.get("args") or [])], image
        if image is None:
            raise PodError(f"container {container['name']}: no command (the image's entrypoint cannot be run "
                           "locally unless the test names it)")
        return [*image.entrypoint, *(container.get("args") or image.cmd)], image

    def _pod_ports(self) -> dict[str, str]:
        """Every containerPort of the pod (its containers share a network) -> its loopback stand-in."""
        containers = [*(self.spec.get("initContainers") or []), *self.spec["containers"]]
        declared = {int(p["containerPort"]) for c in containers for p in c.get("ports") or []}
        return {str(port): str(self._host_port(port)) for port in sorted(declared)}

    def _rewrite_address(self, value: str, ports: Mapping[str, str]) -> str:
        match = re.fullmatch(r"(?:0\.0\.0\.0|127\.0\.0\.1|localhost)?:(\d+)", value)
        if match is None or match[1] not in ports:
            return value
        return f"127.0.0.1:{ports[match[1]]}"

    def _home(self, container: Obj, image: Image | None) -> Path:
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        if image is None:
            return home
        prefix = image.home.rstrip("/") + "/"
        for mount_path, local in self._mount_map(container):
            if mount_path.startswith(prefix):
                link = home / mount_path[len(prefix):]
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(local, target_is_directory=True)
        return home

    def argv(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment the process gets: expanded, paths and ports rewritten."""
        container = self.container(name)
        command, image = self._command(container)
        declared = self.environment(name)
        # $(VAR) sees only the container's own variables, not the image's (as the kubelet expands them).
        env = dict(image.env if image else ()) | declared
        mounts = self._mount_map(container)
        ports = {str(p["containerPort"]): str(self._host_port(p["containerPort"]))
                 for p in container.get("ports") or []}
        argv = [expand(a, declared) for a in command]
        argv = [ports.get(a, self._rewrite_paths(a, mounts)) for a in argv]
        pod_ports = self._pod_ports()
        env = {k: self._rewrite_address(self._rewrite_paths(v, mounts), pod_ports) for k, v in env.items()}
        home = self._home(container, image)
        base = {"PATH": os.pathsep.join([*self.extra_path, str(LITELLM_BIN), *SYSTEM_PATH]),
                "HOME": str(home), "LANG": "C.UTF-8"}
        return argv, base | env

    def _popen(self, name: str, log: Path) -> subprocess.Popen[bytes]:
        argv, env = self.argv(name)
        workdir = self.root / "workdir"
        workdir.mkdir(exist_ok=True)
        out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed on stop
        try:
            # A session of its own, so stop() can signal the process group it started and nothing else.
            return subprocess.Popen(argv, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()

    def start(self, name: str) -> Process:
        container = self.container(name)
        log = self.root / f"{name}.log"
        return Process(self, container, self._popen(name, log), log, _snapshot_read_only(self, container))

    def run(self, name: str, timeout: float) -> Finished:
        """Run a container to completion (an init container), with a deadline."""
        argv, env = self.argv(name)
        workdir = self.root / "workdir"
        workdir.mkdir(exist_ok=True)
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise
        return Finished(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)


def _read_only_mounts(pod: Pod, container: Obj) -> list[Path]:
    kinds = {v["name"]: v for v in pod.spec.get("volumes") or []}
    paths = []
    for m in container.get("volumeMounts") or []:
        volume = kinds[m["name"]]
        # The kubelet mounts configMap and secret volumes read-only whatever the mount says.
        if m.get("readOnly") or "configMap" in volume or "secret" in volume:
            paths.append(pod.mounts_root / m["name"])
    return paths


def _snapshot_read_only(pod: Pod, container: Obj) -> dict[Path, str]:
    """Tests run as root, so read-only mounts cannot be enforced; instead stop() checks that nothing in
    them changed (a container that writes there would fail on a real node)."""
    return {p: _tree_hash(p) for p in _read_only_mounts(pod, container)}


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


@dataclass
class Process:
    pod: Pod
    container: Obj
    popen: subprocess.Popen[bytes]
    log: Path
    read_only: dict[Path, str]

    def port(self, port: int | str) -> int:
        """The loopback port standing in for a container port (by number or by name)."""
        if isinstance(port, str):
            named = {p.get("name"): p["containerPort"] for p in self.container.get("ports") or []}
            if port not in named:
                raise PodError(f"container {self.container['name']} has no port named {port!r}")
            port = int(named[port])
        return self.pod.ports[port]

    def url(self, port: int | str = "http") -> str:
        return f"http://127.0.0.1:{self.port(port)}"

    def probe(self, kind: str = "readinessProbe", timeout: float = 5.0) -> int:
        """One httpGet probe as the kubelet sends it; the status code, or 0 when nothing answered. An exec
        probe runs its command with the container's environment: 200 when it exits 0, else 0."""
        spec = self.container.get(kind)
        if spec is not None and "exec" in spec:
            return self._exec_probe(spec, max(timeout, float(spec.get("timeoutSeconds", 1))))
        if spec is None or "httpGet" not in spec:
            raise PodError(f"container {self.container['name']} has no httpGet {kind}")
        get = spec["httpGet"]
        if get.get("scheme", "HTTP") != "HTTP":
            raise PodError("only HTTP probes are supported")
        request = urllib.request.Request(f"{self.url(get['port'])}{get.get('path', '/')}")
        for header in get.get("httpHeaders") or []:
            request.add_header(header["name"], header["value"])
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def _exec_probe(self, spec: Obj, timeout: float) -> int:
        _, env = self.pod.argv(self.container["name"])
        try:
            done = subprocess.run(spec["exec"]["command"], env=env, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 0
        return 200 if done.returncode == 0 else 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        """Until the readiness probe passes (the kubelet's 200-399), failing early if the process exits."""

        def ready() -> bool:
            if not self.alive():
                raise PodError(f"{self.container['name']} exited with {self.popen.returncode}:\n"
                               f"{self.output()[-3000:]}")
            return 200 <= self.probe("readinessProbe", timeout=2.0) < 400

        wait_for(f"{self.container['name']} to become ready", ready, timeout, interval=0.25)

    def stop(self) -> None:
        _kill_group(self.popen)
        changed = [str(p) for p, h in self.read_only.items() if _tree_hash(p) != h]
        if changed:
            raise PodError(f"container wrote into read-only mounts: {changed}")
