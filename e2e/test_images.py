"""The images the local cluster's pods run (e2e/images.py), each started with podman (runc, host network,
loopback only) and checked the way a pod would use it. Images come from the cache (`make deps` builds
them once on a fresh machine); every container a test starts is removed, whatever the outcome."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e import chart, images
from e2e.stub_backend import REPLY, SEEN_PATH
from kaos_modelapi import litellm, ollama

PREFIX = "kaos-test-images-"
# A container whose test process died (SIGKILL: no teardown) stops by itself after this, and the next
# session removes it.
CONTAINER_LIFETIME = 900
BOOT_TIMEOUT = 180.0  # LiteLLM imports for 7+ s on two idle cores; other sessions share them
MOCK_MODEL = "mock-model"


class Podman:
    """Starts containers under unique names and removes every one of them at close()."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _name(self) -> str:
        name = f"{PREFIX}{secrets.token_hex(4)}"
        self.names.append(name)
        return name

    def _args(self, image: str, args: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
        images.ensure_loaded(image)
        return images.podman_cmd(
            "run", "--name", self._name(), *images.RUNTIME_FLAGS, "--network", "host", *flags, image, *args
        )

    def run(self, image: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run to completion; return the exit code and output."""
        return subprocess.run(self._args(image, args, flags), capture_output=True, text=True, timeout=300)

    def start(self, image: str, *args: str, flags: tuple[str, ...] = ()) -> str:
        """Start in the background; return the container's name."""
        cmd = self._args(image, args, ("--detach", "--timeout", str(CONTAINER_LIFETIME), *flags))
        name = self.names[-1]
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
        return name

    def state(self, name: str) -> str:
        out = subprocess.run(images.podman_cmd("inspect", "--format", "{{.State.Status}}", name),
                             capture_output=True, text=True)
        return out.stdout.strip()

    def logs(self, name: str) -> str:
        out = subprocess.run(images.podman_cmd("logs", name), capture_output=True, text=True)
        return (out.stdout + out.stderr)[-4000:]

    def close(self) -> None:
        for name in self.names:
            subprocess.run(images.podman_cmd("rm", "--force", "--time", "0", name), capture_output=True)


def remove_stopped_leftovers() -> None:
    """Containers of earlier sessions that died before their teardown (running ones may be another
    session's, so only stopped ones go)."""
    listed = subprocess.run(
        images.podman_cmd("ps", "--all", "--filter", f"name=^{PREFIX}", "--filter", "status=exited", "--format",
                          "{{.Names}}"),
        capture_output=True, text=True,
    )
    for name in listed.stdout.split():
        subprocess.run(images.podman_cmd("rm", "--force", name), capture_output=True)


@pytest.fixture
def podman() -> Iterator[Podman]:
    remove_stopped_leftovers()
    p = Podman()
    try:
        yield p
    finally:
        p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_http_ok(podman: Podman, name: str, url: str, timeout: float = BOOT_TIMEOUT) -> None:
    """Until `url` answers 200; fail early, with the container's log, if the container stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http(url)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        if podman.state(name) not in ("running", "created", "configured"):
            pytest.fail(f"container {name} stopped before {url} answered:\n{podman.logs(name)}")
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within {timeout:.0f} s:\n{podman.logs(name)}")


def image_config(ref: str) -> dict[str, Any]:
    images.ensure_loaded(ref)
    out = images.run(images.podman_cmd("image", "inspect", ref)).stdout
    config: dict[str, Any] = json.loads(out)[0]["Config"]
    return config


def chat(port: int, content: str, headers: dict[str, str] | None = None, **extra: Any) -> tuple[int, Any]:
    body = {"model": MOCK_MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return http(f"http://127.0.0.1:{port}/v1/chat/completions", body, headers)


# --- what every image is ------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", list(images.images()))
def test_archive_is_named_with_the_ref_a_pod_asks_for(ref: str) -> None:
    with tarfile.open(images.build(ref)) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    assert [m["RepoTags"] for m in manifest] == [[ref]]


def test_cache_key_covers_exactly_what_the_dockerfile_copies() -> None:
    context = images.operator_context()
    assert {"Dockerfile", "pyproject.toml", "requirements.lock", "kaos_modelapi/__init__.py"} <= set(context)
    assert not [n for n in context if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("e2e/", "tests/"))]
    catalog = images.images()
    keys = {ref: images.image_key(image, catalog) for ref, image in catalog.items()}
    assert len(set(keys.values())) == len(keys)


def test_operator_source_change_keeps_the_base(tmp_path: Path) -> None:
    catalog = images.images()
    operator = catalog[images.OPERATOR_REF]
    changed = tmp_path / "cli.py"
    changed.write_text(operator.context["kaos_modelapi/cli.py"].read_text() + "\n# changed\n")
    edited = images.Image(operator.ref, {**operator.context, "kaos_modelapi/cli.py": changed}, "Dockerfile")
    assert images.image_key(edited, catalog) != images.image_key(operator, catalog)
    assert images.image_key(catalog[images.BASE_REF], catalog) == images.image_key(catalog[images.BASE_REF])


def test_cluster_down_removes_what_a_build_stopped_midway_left(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A build stopped midway (Ctrl-C, a killed CI run) leaves buildah's working containers behind, their root
    filesystems mounted; `make cluster-down` runs `images.py tidy`, which removes them unless a build is
    running (that build removes them when it ends). A private storage: the real one is never touched."""
    monkeypatch.setenv("KAOS_IMAGES_CACHE", str(tmp_path / "images"))
    storage = tmp_path / "images" / "storage"

    def tidy() -> str:
        return images.run([sys.executable, str(images.REPO / "e2e" / "images.py"), "tidy"]).stdout

    def left() -> tuple[list[str], list[str]]:
        names = images.run(images.buildah_cmd("containers", "--format", "{{.ContainerName}}")).stdout.split()
        roots = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        return names, [r for r in roots if r.startswith(str(storage)) and r.endswith("/merged")]

    try:
        for name in ("kaos-test-stopped-build-1", "kaos-test-stopped-build-2"):  # as `buildah bud` makes them
            images.run(images.buildah_cmd("from", "--name", name, "scratch"))
            images.run(images.buildah_cmd("mount", name))
        names, mounts = left()
        assert len(names) == 2 and len(mounts) == 2
        with images._lock():  # a build is running
            assert "a build is running" in tidy()
            assert left()[0] == names
        assert "removed" in tidy()
        assert left() == ([], [])
    finally:
        images.clean()


def test_debootstrap_uses_the_mirror_apt_uses() -> None:
    one_line = "deb [arch=amd64] http://mirror.example/debian bookworm main\n"
    deb822 = "Types: deb\nURIs: http://other.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
    assert list(images._uris_for_suite(one_line, "bookworm")) == ["http://mirror.example/debian"]
    assert list(images._uris_for_suite(deb822, "bookworm")) == ["http://other.example/debian"]
    assert not list(images._uris_for_suite(deb822.replace("bookworm ", ""), "bookworm"))
    assert images.debian_mirror().startswith(("http://", "https://"))


# --- the operator image -------------------------------------------------------------------------------


# A read-only root with nothing writable added (podman would otherwise mount tmpfs on /tmp, /run, ...;
# Kubernetes does not) and no capabilities, as the chart's securityContext asks.
POD_LIKE = ("--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL")


def test_operator_image_runs_as_65532_with_a_read_only_root(podman: Podman) -> None:
    assert image_config(images.OPERATOR_REF)["User"] == "65532:65532"
    done = podman.run(images.OPERATOR_REF, "--help", flags=POD_LIKE)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower() and "--kubeconfig" in done.stdout
    ids = podman.run(images.OPERATOR_REF, "-c", "import os; print(os.getuid(), os.getgid())",
                     flags=(*POD_LIKE, "--entrypoint", "python3"))
    assert ids.stdout.split() == ["65532", "65532"], ids.stderr


def test_chart_runs_the_operator_image_built_here() -> None:
    objs = chart.render(chart.build_helm(), "kaos", "kaos-system", *images.operator_chart_flags())
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == images.OPERATOR_REF
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert f"--litellm-image={images.litellm_ref()}" in container["args"]


# --- the LiteLLM image --------------------------------------------------------------------------------


def test_litellm_image_is_the_operators_default_with_upstreams_layout() -> None:
    assert images.litellm_ref() == litellm.DEFAULT_IMAGE
    config = image_config(litellm.DEFAULT_IMAGE)
    assert config.get("User", "") in ("", "root")
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"] == ["docker/prod_entrypoint.sh"]
    assert config["Cmd"] == ["--port", "4000"]
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in config["Env"]


# Pod-like restrictions: a numeric non-root user, a read-only root without podman's automatic tmpfs mounts
# (Kubernetes adds none), no capabilities. LiteLLM (this release) needs a writable temp dir at import, so
# such a pod must mount one at /tmp; here a tmpfs stands for that emptyDir.
RESTRICTED = ("--user", "65532:65532", "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
              "--tmpfs", "/tmp:mode=1777")


@pytest.mark.parametrize("restricted", [False, True], ids=["as-rendered", "restricted"])
def test_litellm_image_serves_the_operators_boot_script_in_mock_mode(
    podman: Podman, tmp_path: Path, restricted: bool
) -> None:
    """The operator's pod command (`python3 -c BOOT_SCRIPT --config ... --port ...`) with its env, a mock
    config mounted read-only and an empty runtime dir: a request without a key gets its mock_response."""
    (tmp_path / litellm.CONFIG_FILE).write_text(yaml.safe_dump(litellm.mock_config(MOCK_MODEL)))
    tmp_path.chmod(0o755)  # readable by the restricted user too
    port = free_port()
    name = podman.start(
        litellm.DEFAULT_IMAGE, "-c", litellm.BOOT_SCRIPT,
        "--config", litellm.CONFIG_PATH, "--port", str(port), "--host", "127.0.0.1",
        flags=(
            "--entrypoint", "python3",
            "--volume", f"{tmp_path}:{litellm.CONFIG_DIR}:ro",
            "--tmpfs", f"{litellm.RUNTIME_DIR}:mode=1777",
            "--env", f"{litellm.ENV_MASTER_KEY}=sk-{secrets.token_hex(8)}",
            "--env", f"{litellm.ENV_AUTH}={litellm.AUTH_MOCK}",
            "--env", f"{litellm.ENV_RUNTIME_DIR}={litellm.RUNTIME_DIR}",
            *(RESTRICTED if restricted else ()),
        ),
    )
    wait_http_ok(podman, name, f"http://127.0.0.1:{port}{litellm.READINESS_PATH}")
    status, answer = chat(port, "ping", mock_response="pong from the image")
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == "pong from the image"


def test_litellm_image_entrypoint_takes_config_and_port(podman: Podman, tmp_path: Path) -> None:
    """Upstream's way to run the image: its entrypoint with `--config FILE --port P`."""
    key = f"sk-{secrets.token_hex(8)}"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(litellm.mock_config(MOCK_MODEL)))
    port = free_port()
    name = podman.start(
        litellm.DEFAULT_IMAGE, "--config", "/etc/litellm/config.yaml", "--port", str(port), "--host", "127.0.0.1",
        flags=("--volume", f"{tmp_path}:/etc/litellm:ro", "--env", f"LITELLM_MASTER_KEY={key}"),
    )
    wait_http_ok(podman, name, f"http://127.0.0.1:{port}{litellm.READINESS_PATH}")
    status, answer = chat(port, "ping", headers={"Authorization": f"Bearer {key}"})
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == litellm.MOCK_DEFAULT_RESPONSE


# --- the stand-in backend and the client --------------------------------------------------------------


def test_backend_image_answers_and_the_client_image_reaches_it(podman: Podman) -> None:
    port = free_port()
    backend = podman.start(images.STUB_BACKEND_REF, "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(podman, backend, f"{url}/api/tags", timeout=60)
    status, answer = http(f"{url}/v1/chat/completions", {"model": "m", "messages": []})
    assert (status, answer["choices"][0]["message"]["content"]) == (200, REPLY)

    body = json.dumps({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}]})
    sent = podman.run(images.CLIENT_REF, "kaos-http", "-d", body, f"{url}/api/chat")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["message"]["content"] == REPLY
    missing = podman.run(images.CLIENT_REF, "kaos-http", f"{url}/no/such/path")
    assert missing.returncode == 22 and "HTTP 404" in missing.stderr

    status, seen = http(f"{url}{SEEN_PATH}")
    assert status == 200
    assert [s["path"] for s in seen][-2:] == ["/api/chat", "/no/such/path"]
    assert seen[-2]["body"]["model"] == "smollm2:135m"


# --- the Ollama image ---------------------------------------------------------------------------------


def test_ollama_image_is_the_operators_default_with_upstreams_layout(podman: Podman) -> None:
    assert images.ollama_image().ref == ollama.DEFAULT_IMAGE
    config = image_config(ollama.DEFAULT_IMAGE)
    assert config.get("User", "") in ("", "root", "0:0")
    assert config["Entrypoint"] == ["/bin/ollama"]
    assert config["Cmd"] == ["serve"]
    assert "OLLAMA_HOST=0.0.0.0:11434" in config["Env"]
    out = podman.run(ollama.DEFAULT_IMAGE, "--version")
    assert f"version is {ollama.OLLAMA_VERSION}" in out.stdout + out.stderr, out.stderr


def test_ollama_image_serves_from_its_own_entrypoint(podman: Podman) -> None:
    port = free_port()
    name = podman.start(ollama.DEFAULT_IMAGE, flags=("--env", f"OLLAMA_HOST=127.0.0.1:{port}"))
    wait_http_ok(podman, name, f"http://127.0.0.1:{port}/api/tags")
    assert http(f"http://127.0.0.1:{port}/api/tags") == (200, {"models": []})
