"""The pure parts of kaos_modelapi.ollama. The pull script itself runs under /bin/sh against a stand-in
ollama in e2e/test_ollama_pull.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from kaos_modelapi import ollama


def test_image_is_a_pinned_release() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", ollama.OLLAMA_VERSION)
    repository, tag = ollama.DEFAULT_IMAGE.rsplit(":", 1)
    assert (repository, tag) == ("docker.io/ollama/ollama", ollama.OLLAMA_VERSION)


def test_constants() -> None:
    assert ollama.PORT == 11434
    assert ollama.DATA_DIR == "/var/lib/ollama"  # (not under /root, which only root may enter in the image)
    assert ollama.MODELS_DIR == "/var/lib/ollama/models"
    assert ollama.LIVENESS_PATH.startswith("/")


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_pull_script_is_valid_posix_sh(shell: str) -> None:
    path = shutil.which(shell)
    if path is None:
        pytest.fail(f"{shell} is needed to check the pull script (apt-get install {shell})")
    argv = [path, "--posix", "-n"] if shell == "bash" else [path, "-n"]
    done = subprocess.run(argv, input=ollama.PULL_SCRIPT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_model_name_is_only_ever_expanded_inside_double_quotes() -> None:
    script = ollama.PULL_SCRIPT
    uses = [m.start() for m in re.finditer(r"\$\{?OLLAMA_MODEL", script)]
    assert len(uses) >= 2
    for start in uses:
        line = script[script.rfind("\n", 0, start) + 1 : start]
        # An odd number of double quotes before it on its line: the expansion sits inside "...".
        assert line.count('"') % 2 == 1, line
    assert "eval" not in script.split()


def test_pull_script_waits_with_a_deadline_and_cleans_up() -> None:
    script = ollama.PULL_SCRIPT
    assert "ollama serve &" in script
    assert "until ollama list" in script
    assert ollama.ENV_START_TIMEOUT in script and "deadline" in script
    assert 'ollama pull "$OLLAMA_MODEL"' in script
    assert "trap stop EXIT" in script
