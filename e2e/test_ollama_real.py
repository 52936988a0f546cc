"""Hosted mode on the real Ollama: the operator's rendered pod (the pull-model init container's script and
the serving container, unchanged) run as local processes by e2e/pod.py with the `ollama` binary of the
pinned release (built from source by e2e/ollama_build.py), pulling a tiny generated model
(e2e/tiny_model.py) from a stand-in of Ollama's registry (e2e/ollama_registry.py).

The model reference is the one a user writes (`kaos-tiny:random`, meaning registry.ollama.ai/library/
kaos-tiny:random). The only additions are what a cluster behind a corporate proxy sets through
hostedConfig.env: HTTPS_PROXY (the stand-in's CONNECT proxy, which reaches nothing but the stand-in) and
SSL_CERT_FILE (the session's test CA, mounted from a ConfigMap through podSpec, as on a node).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import ollama_build
from e2e.ollama_registry import REGISTRY_HOST, RunningRegistry, running_registry
from e2e.pod import E2E_DIR, Finished, Image, Pod, Process, wait_for
from e2e.test_hosted_node import ca_configmap, hosted
from e2e.test_litellm_datapath import keyless_client
from e2e.test_litellm_datapath import modelapi as proxy_modelapi
from e2e.test_litellm_datapath import render as render_proxy
from e2e.tiny_model import registry_model
from kaos_modelapi import ollama, status
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.desired import CONTAINER, INIT_CONTAINER, build
from kaos_modelapi.settings import Settings

MODEL = "kaos-tiny:random"
PULL_TIMEOUT = 180.0  # a cold `ollama serve` start plus a 0.5 MB pull, on two shared cores
READY_TIMEOUT = 120.0
CHAT_TIMEOUT = 120.0  # the first chat loads the model
LITELLM_READY_TIMEOUT = 300.0
# Few tokens: the weights are noise, so only the shape of the answer is meaningful.
CHAT_OPTIONS = {"num_predict": 8, "seed": 7, "temperature": 0.8}

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def ollama_bin() -> Path:
    # Cached by `make deps`; a cold build here takes minutes (see e2e/ollama_build.py).
    return ollama_build.build()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        running.registry.add(MODEL, registry_model())
        yield running


def ollama_image(binary: Path) -> Image:
    """The official image's config (Dockerfile at the release): ENTRYPOINT ["/bin/ollama"], CMD ["serve"],
    ENV OLLAMA_HOST=0.0.0.0:11434, running as root."""
    return Image(entrypoint=(str(binary),), cmd=("serve",), env=(("OLLAMA_HOST", f"0.0.0.0:{ollama.PORT}"),),
                 home="/root")


def hosted_pod(binary: Path, registry: RunningRegistry, model: str, root: Path) -> Pod:
    """The pod the operator renders for a Hosted ModelAPI (the stand-in registry's CA mounted as on a node),
    its containers run here."""
    modelapi = hosted("tiny", model, registry, place=lambda spec: spec)
    modelapi["metadata"] |= {"namespace": "e2e", "uid": "uid-tiny"}
    children = build(ModelAPI.model_validate(modelapi), Settings()).children
    return Pod.from_objects([*children, ca_configmap(registry)], root, extra_path=[binary.parent],
                            images={ollama.DEFAULT_IMAGE: ollama_image(binary)})


def nothing_listens(pod: Pod) -> bool:
    """True when nothing answers on the pod's Ollama port (its loopback stand-in)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", pod.ports[ollama.PORT])) != 0


@dataclass
class Served:
    pod: Pod
    pulled: Finished
    process: Process

    def call(self, path: str, body: Obj | None = None, timeout: float = CHAT_TIMEOUT) -> Obj:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.process.url()}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result: Obj = json.loads(response.read())
            return result


@pytest.fixture(scope="module")
def served(ollama_bin: Path, registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pod = hosted_pod(ollama_bin, registry, MODEL, tmp_path_factory.mktemp("hosted"))
    pulled = pod.run(INIT_CONTAINER, timeout=PULL_TIMEOUT)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert nothing_listens(pod), "the init container left its ollama server running"
    process = pod.start(CONTAINER)
    try:
        process.wait_ready(READY_TIMEOUT)
        yield Served(pod, pulled, process)
    finally:
        process.stop()


# --- the binary ------------------------------------------------------------------------------------------


def test_the_binary_is_the_pinned_release(ollama_bin: Path) -> None:
    out = subprocess.run([str(ollama_bin), "--version"], capture_output=True, text=True, timeout=30)
    assert f"version is {ollama.OLLAMA_VERSION}" in out.stdout + out.stderr
    assert ollama.DEFAULT_IMAGE.endswith(f":{ollama.OLLAMA_VERSION}")


# --- pull and serve --------------------------------------------------------------------------------------


def test_the_init_container_pulls_the_model_from_the_registry(served: Served, registry: RunningRegistry) -> None:
    assert f"pull-model: pulled {MODEL}" in served.pulled.stdout
    # Ollama's progress bars (redrawn with terminal escapes) came out as lines the operator reads: the
    # model's layer in Ollama's units, to 100%, and Ollama's other messages once each.
    log = served.pulled.stdout
    assert "\x1b" not in log
    assert status.parse_progress(log) == status.PullProgress(100, layer_size(), layer_size())
    assert log.count("pulling manifest") == 1 and log.count("success") == 1
    seen = registry.registry.seen()
    manifests = [r for r in seen if r.path == "/v2/library/kaos-tiny/manifests/random"]
    assert manifests and all(r.user_agent.startswith(f"ollama/{ollama.OLLAMA_VERSION} ") for r in manifests)
    assert manifests[0].host == REGISTRY_HOST
    # Every layer was fetched (from the direct URL the registry redirected to), nothing else was reached.
    fetched = {r.path.rsplit("/", 1)[1] for r in seen if r.path.startswith("/direct/") and r.method == "GET"}
    assert fetched == set(registry_model().blobs)
    assert registry.connects.allowed and not registry.connects.refused
    # The model landed in the pod's volume (mounted at ollama.DATA_DIR), where the serving container reads it.
    models = served.pod.mounts_root / ollama.VOLUME_NAME / "models"
    assert (models / "manifests" / REGISTRY_HOST / "library" / "kaos-tiny" / "random").is_file()


def test_the_served_model_is_listed(served: Served) -> None:
    assert served.process.probe("readinessProbe") == 200
    assert served.process.probe("livenessProbe") == 200
    tags = served.call("/api/tags")
    (entry,) = [m for m in tags["models"] if m["name"] == MODEL]
    assert entry["details"]["family"] == "llama"
    # Ollama's size of a model: its layers and its config, as the registry listed them.
    assert entry["size"] == sum(len(blob) for blob in registry_model().blobs.values())


def test_ready_means_the_model_is_loaded(served: Served) -> None:
    # The readiness probe passed (the fixture waited for it): the model is already in memory.
    assert [m["name"] for m in served.call("/api/ps")["models"]] == [MODEL]
    # Unloaded (a client's keep_alive 0), the next probe loads it again before it passes.
    _unload(served)
    assert served.process.probe("readinessProbe", timeout=120) == 200
    assert [m["name"] for m in served.call("/api/ps")["models"]] == [MODEL]


def test_chat_answers(served: Served) -> None:
    answer = served.call("/api/chat", {"model": MODEL, "stream": False, "options": CHAT_OPTIONS,
                                       "messages": [{"role": "user", "content": "hello tiny model"}]})
    assert answer["model"] == MODEL
    assert answer["done"] is True
    assert answer["message"]["role"] == "assistant"
    assert isinstance(answer["message"]["content"], str)
    # The prompt went through the template and the tokenizer; tokens were generated.
    assert answer["prompt_eval_count"] > 3  # three words, plus the role markers and turn ends
    assert 1 <= answer["eval_count"] <= CHAT_OPTIONS["num_predict"]


def layer_size() -> str:
    """The tiny model's weights layer as Ollama writes its size (hundreds of KB: whole KB, truncated)."""
    return f"{len(registry_model().blobs[registry_model().model_digest]) // 1000} KB"


def test_a_slow_pull_logs_its_progress_percent_by_percent(
    ollama_bin: Path, registry: RunningRegistry, tmp_path: Path
) -> None:
    pod = hosted_pod(ollama_bin, registry, MODEL, tmp_path)
    registry.registry.blob_rate = 200_000  # the 0.5 MB layer in a few seconds, as a large model on a slow link
    try:
        finished = pod.run(INIT_CONTAINER, timeout=PULL_TIMEOUT)
    finally:
        registry.registry.blob_rate = None
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = [line for line in finished.stdout.splitlines() if line.startswith(ollama.PROGRESS_PREFIX)]
    progress = [status.parse_progress(line) for line in lines]
    percents = [p.percent for p in progress if p is not None]
    assert len(percents) == len(lines) > 2 and percents == sorted(set(percents)) and percents[-1] == 100
    assert all(p is not None and p.total == layer_size() for p in progress)


# --- an unknown model ------------------------------------------------------------------------------------


def test_an_unknown_model_fails_the_pull_with_the_reason_in_the_log(
    ollama_bin: Path, registry: RunningRegistry, tmp_path: Path
) -> None:
    pod = hosted_pod(ollama_bin, registry, "no-such-model:1b", tmp_path)
    finished = pod.run(INIT_CONTAINER, timeout=PULL_TIMEOUT)
    assert finished.returncode != 0
    # What `kubectl logs -c pull-model` (the ModelPullFailed status hint) shows the user: which model,
    # and Ollama's own reason.
    log = finished.stdout + finished.stderr
    assert "pull-model: pulling no-such-model:1b failed" in log
    assert "pull model manifest: file does not exist" in log
    assert nothing_listens(pod), "the init container left its ollama server running"
    assert any(r.path == "/v2/library/no-such-model/manifests/1b" for r in registry.registry.seen())


# --- through LiteLLM ------------------------------------------------------------------------------------


def test_a_wildcard_proxy_serves_the_model_through_litellm(served: Served, tmp_path: Path) -> None:
    subprocess.run(["bash", str(E2E_DIR / "install-litellm.sh")], check=True, timeout=900)
    _unload(served)  # so that a loaded model afterwards can only be LiteLLM's doing
    children = render_proxy(proxy_modelapi("wild", {"apiBase": served.process.url()}))
    proxy = Pod.from_objects(children, tmp_path).start(CONTAINER)
    try:
        proxy.wait_ready(LITELLM_READY_TIMEOUT)
        response = keyless_client(proxy).chat.completions.create(
            model=f"ollama_chat/{MODEL}", max_tokens=8,
            messages=[{"role": "user", "content": "hello through the proxy"}])
    finally:
        proxy.stop()
    assert response.choices[0].message.role == "assistant"
    assert isinstance(response.choices[0].message.content, str)
    # Token counts that only Ollama's /api/chat reports: the prompt through the template, what it generated.
    assert response.usage is not None
    assert response.usage.prompt_tokens > 3 and 1 <= response.usage.completion_tokens <= 8
    assert [m["name"] for m in served.call("/api/ps")["models"]] == [MODEL]


# --- first-request latency -------------------------------------------------------------------------------


def _unload(served: Served) -> None:
    served.call("/api/generate", {"model": MODEL, "keep_alive": 0})
    wait_for("the model to be unloaded", lambda: not served.call("/api/ps")["models"], timeout=60)


def _timed_chat(served: Served) -> tuple[float, float]:
    """Wall time of one short chat, and the part Ollama says it spent loading the model."""
    began = time.monotonic()
    answer = served.call("/api/chat", {"model": MODEL, "stream": False, "options": {**CHAT_OPTIONS, "num_predict": 1},
                                       "messages": [{"role": "user", "content": "hello"}]})
    return time.monotonic() - began, answer["load_duration"] / 1e9


def test_first_request_latency_with_and_without_preloading(served: Served) -> None:
    _unload(served)
    cold, cold_load = _timed_chat(served)
    _unload(served)
    began = time.monotonic()
    # Preloading as Ollama documents it: a generate request without a prompt loads the model and keeps it.
    served.call("/api/generate", {"model": MODEL, "keep_alive": "10m"})
    preload = time.monotonic() - began
    assert [m["name"] for m in served.call("/api/ps")["models"]] == [MODEL]
    warm, warm_load = _timed_chat(served)
    print(f"\nfirst /api/chat on {MODEL} (one token): {cold:.2f} s without preloading (loading {cold_load:.2f} s); "
          f"{warm:.2f} s after a preload (loading {warm_load:.2f} s; the preload took {preload:.2f} s)")


def test_a_model_that_was_not_pulled_is_refused(served: Served) -> None:
    with pytest.raises(urllib.error.HTTPError, match="404"):
        served.call("/api/chat", {"model": "not-pulled:1b", "stream": False,
                                  "messages": [{"role": "user", "content": "hi"}]})
