"""Hosted mode's pull-model init container, run by a real /bin/sh exactly as the operator renders it,
against a stand-in `ollama` (e2e/standins/ollama) that starts slowly and records what it was asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from e2e.pod import STANDINS_DIR, Finished, Pod
from kaos_modelapi import ollama
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.desired import INIT_CONTAINER, build
from kaos_modelapi.settings import Settings

# Generous against a loaded 2-core machine; every test finishes far sooner when the script is right.
RUN_TIMEOUT = 60.0


def hosted(model: str, **standin: str) -> dict[str, Any]:
    # The stand-in's knobs go through hostedConfig.env, the same path a user's variables take.
    env = [{"name": k, "value": v} for k, v in standin.items()]
    return {
        "apiVersion": "kaos.tools/v1alpha1",
        "kind": "ModelAPI",
        "metadata": {"name": "ollama", "namespace": "e2e"},
        "spec": {"mode": "Hosted", "hostedConfig": {"model": model, "env": env}},
    }


def run_pull(tmp_path: Path, model: str, **standin: str) -> tuple[Finished, list[dict[str, Any]]]:
    # The stand-in keeps its state in the container's /tmp (an emptyDir of the pod, found here).
    modelapi = ModelAPI.model_validate(hosted(model, FAKE_OLLAMA_STATE="/tmp/ollama-state", **standin))
    children = build(modelapi, Settings()).children
    pod = Pod.from_objects(children, tmp_path / "pod", extra_path=[STANDINS_DIR])
    state = pod.mounts_root / "tmp" / "ollama-state"
    state.mkdir()
    finished = pod.run(INIT_CONTAINER, timeout=RUN_TIMEOUT)
    calls_file = state / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return finished, calls


def events(calls: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [c for c in calls if c["event"] == name]


def test_rendered_init_container_is_the_pull_script(tmp_path: Path) -> None:
    children = build(ModelAPI.model_validate(hosted("smollm2:135m")), Settings()).children
    pod = Pod.from_objects(children, tmp_path)
    container = pod.container(INIT_CONTAINER)
    assert container["command"] == ["/bin/sh", "-c", ollama.PULL_SCRIPT]
    assert container["image"] == ollama.DEFAULT_IMAGE
    assert "smollm2" not in ollama.PULL_SCRIPT
    assert pod.environment(INIT_CONTAINER)[ollama.ENV_MODEL] == "smollm2:135m"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    serving = {m["name"]: m["mountPath"] for m in pod.container("model-api")["volumeMounts"]}
    assert mounts == serving == {ollama.VOLUME_NAME: ollama.DATA_DIR, "tmp": "/tmp"}


def test_waits_for_a_slow_server_then_pulls_the_model_from_the_environment(tmp_path: Path) -> None:
    delay = 2.5
    finished, calls = run_pull(tmp_path, "smollm2:135m", FAKE_OLLAMA_START_DELAY=str(delay))
    assert finished.returncode == 0, finished.stderr
    ready = events(calls, "serve-ready")[0]["time"]
    polls = events(calls, "list")
    assert [p for p in polls if not p["answered"]], "the script never polled before the server answered"
    assert polls[-1]["answered"] and polls[-1]["time"] >= ready
    (pull,) = events(calls, "pull")
    assert pull["argv"] == ["pull", "smollm2:135m"]
    assert pull["time"] >= ready
    # It moves on soon after the server answers (poll interval 1 s), not after a fixed long sleep...
    assert pull["time"] - ready < 2.5
    assert events(calls, "serve-stopped"), "the background server was left running"


def test_a_server_that_answers_at_once_costs_no_fixed_wait(tmp_path: Path) -> None:
    # ...and with a server that answers at once there is no wait at all.
    finished, calls = run_pull(tmp_path, "smollm2:135m")
    assert finished.returncode == 0, finished.stderr
    assert finished.seconds < 4.5  # one 1 s poll at most, plus process starts on a loaded machine
    assert events(calls, "pull")[0]["argv"] == ["pull", "smollm2:135m"]


def test_a_failed_pull_fails_the_init_container(tmp_path: Path) -> None:
    finished, calls = run_pull(tmp_path, "no-such-model:1b", FAKE_OLLAMA_PULL="fail")
    assert finished.returncode != 0
    assert "no-such-model:1b" in finished.stderr
    assert events(calls, "pull")[0]["ok"] is False
    assert events(calls, "serve-stopped")


def test_a_server_that_never_answers_fails_after_the_deadline(tmp_path: Path) -> None:
    finished, calls = run_pull(
        tmp_path, "smollm2:135m", FAKE_OLLAMA_START_DELAY="600", KAOS_OLLAMA_START_TIMEOUT="2"
    )
    assert finished.returncode != 0
    assert "did not answer within 2s" in finished.stderr
    assert finished.seconds < 10
    assert not events(calls, "pull")
    assert events(calls, "serve-stopped")


def test_a_server_that_exits_fails_at_once(tmp_path: Path) -> None:
    finished, calls = run_pull(tmp_path, "smollm2:135m", FAKE_OLLAMA_SERVE="crash")
    assert finished.returncode != 0
    assert "exited before it answered" in finished.stderr
    assert finished.seconds < 10
    assert not events(calls, "pull")


@pytest.mark.parametrize(
    "template",
    [
        "x; touch {canary}",
        "$(touch {canary})",
        "`touch {canary}`",
        '"; touch {canary}; echo "',
        "'; touch {canary}; echo '",
        "x && touch {canary} || touch {canary}",
        "x\ntouch {canary}",
        "$$(touch {canary})",
        "-h; touch {canary}",
    ],
)
def test_shell_metacharacters_in_the_model_name_run_nothing(tmp_path: Path, template: str) -> None:
    # The canary in the container's /tmp, which the local pod keeps in its emptyDir's folder (and rewrites
    # the path to, in the environment the process gets, as it does every mount path).
    model = template.format(canary="/tmp/pwned")
    finished, calls = run_pull(tmp_path, model)
    local_tmp = tmp_path / "pod" / "volumes" / "tmp"
    assert not (local_tmp / "pwned").exists(), f"model name {model!r} ran a command"
    (pull,) = events(calls, "pull")
    # The stand-in got the name as one argument; only the kubelet's own $$ -> $ unescaping applies.
    assert pull["argv"] == ["pull", model.replace("$$", "$").replace("/tmp/", f"{local_tmp}/")]
    assert finished.returncode == 0, finished.stderr
