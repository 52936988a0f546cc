"""The pure parts of kaos_modelapi.litellm: generated configs, the boot script's composition (run by the
project's python against a stand-in `litellm` that records how it was exec'd) and the auth hook's logic
(with a stand-in for LiteLLM's types). The real LiteLLM runs in e2e/test_litellm_datapath.py."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaos_modelapi import litellm


def test_version_is_pinned_once() -> None:
    assert litellm.LITELLM_VERSION.count(".") == 2
    repository, tag = litellm.DEFAULT_IMAGE.rsplit(":", 1)
    assert (repository, tag) == ("docker.io/litellm/litellm", f"v{litellm.LITELLM_VERSION}")


def test_paths_and_probes() -> None:
    assert litellm.CONFIG_PATH == "/etc/litellm/config.yaml"
    assert litellm.RUNTIME_DIR == "/var/run/kaos-litellm"
    assert litellm.PORT == 8000
    assert (litellm.LIVENESS_PATH, litellm.READINESS_PATH) == ("/health/liveliness", "/health/readiness")


def test_wildcard_config_forwards_any_name_to_api_base() -> None:
    assert litellm.wildcard_config("http://ollama:11434") == {
        "model_list": [{"model_name": "*", "litellm_params": {"model": "*", "api_base": "http://ollama:11434"}}]
    }


def test_single_model_config_serves_only_that_model() -> None:
    config = litellm.single_model_config("http://ollama:11434", "ollama/smollm2:135m")
    assert config == {
        "model_list": [
            {
                "model_name": "ollama/smollm2:135m",
                "litellm_params": {"model": "ollama/smollm2:135m", "api_base": "http://ollama:11434"},
            }
        ]
    }


def test_mock_config_has_no_backend_and_a_default_answer() -> None:
    (entry,) = litellm.mock_config("gpt-4.6-turbo")["model_list"]
    assert entry["model_name"] == "gpt-4.6-turbo"
    params = entry["litellm_params"]
    assert params["model"] == "gpt-4.6-turbo"
    assert params["mock_response"] == litellm.MOCK_DEFAULT_RESPONSE
    assert "api_base" not in params


@pytest.mark.parametrize(
    ("config", "own"),
    [
        ({}, False),
        ({"general_settings": None}, False),
        ({"general_settings": {"disable_spend_logs": True}}, False),
        ({"general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}}, True),
        ({"general_settings": {"custom_auth": "mine.auth"}}, True),
    ],
)
def test_defines_own_auth(config: dict[str, Any], own: bool) -> None:
    assert litellm.defines_own_auth(config) is own


def test_master_key_secret_name() -> None:
    assert litellm.master_key_secret_name("mock-api") == "litellm-master-key-mock-api"


# --- the boot script ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    returncode: int
    stderr: str
    exec_argv: list[str] | None  # what `litellm` was exec'd with, None if it was not
    runtime: Path


def boot(
    tmp_path: Path, config_text: str, auth: str | None = "open", *extra: str, runtime_dir: str | None = None
) -> Boot:
    """Run BOOT_SCRIPT as the pod does (python3 -c SCRIPT --config ... --port ...), with a stand-in
    `litellm` first on PATH that records its argv."""
    bin_dir, runtime, source = tmp_path / "bin", tmp_path / "runtime", tmp_path / "etc" / "config.yaml"
    for d in (bin_dir, runtime, source.parent):
        d.mkdir(exist_ok=True)
    record = tmp_path / "exec.json"
    standin = bin_dir / "litellm"
    standin.write_text(f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv, open("{record}", "w"))\n')
    standin.chmod(0o755)
    source.write_text(config_text)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", litellm.ENV_RUNTIME_DIR: runtime_dir or str(runtime)}
    if auth is not None:
        env[litellm.ENV_AUTH] = auth
    argv = [sys.executable, "-c", litellm.BOOT_SCRIPT, "--config", str(source), "--port", "8000", *extra]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    exec_argv = json.loads(record.read_text()) if record.exists() else None
    return Boot(done.returncode, done.stderr, exec_argv, runtime)


def test_boot_script_is_stdlib_and_pyyaml_only() -> None:
    imports = {line.split()[1].rstrip(",") for line in litellm.BOOT_SCRIPT.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"argparse", "os", "sys", "yaml"}
    compile(litellm.BOOT_SCRIPT, "<boot>", "exec")
    compile(litellm.AUTH_MODULE, "kaos_auth.py", "exec")


def test_generated_config_gets_the_auth_hook(tmp_path: Path) -> None:
    source = yaml.safe_dump(litellm.wildcard_config("http://ollama:11434"), sort_keys=False)
    result = boot(tmp_path, source)
    assert result.returncode == 0, result.stderr
    composed = result.runtime / "config.yaml"
    assert result.exec_argv is not None
    assert result.exec_argv[1:] == ["--config", str(composed), "--port", "8000"]
    config = yaml.safe_load(composed.read_text())
    assert config == {**litellm.wildcard_config("http://ollama:11434"),
                      "general_settings": {"custom_auth": litellm.CUSTOM_AUTH}}
    assert (result.runtime / "kaos_auth.py").read_text() == litellm.AUTH_MODULE


def test_user_config_is_kept_as_is_apart_from_the_hook(tmp_path: Path) -> None:
    source = """\
model_list:
  - model_name: smart
    litellm_params: {model: gpt-4o, api_key: os.environ/OPENAI_API_KEY}
  - model_name: fast
    litellm_params:
      model: ollama/smollm2:135m
      api_base: http://ollama:11434
litellm_settings:
  drop_params: true
general_settings:
  disable_spend_logs: true
  alerting: []
router_settings: {routing_strategy: simple-shuffle}
"""
    result = boot(tmp_path, source)
    assert result.returncode == 0, result.stderr
    composed = yaml.safe_load((result.runtime / "config.yaml").read_text())
    original = yaml.safe_load(source)
    assert list(composed) == list(original)
    assert [e["model_name"] for e in composed["model_list"]] == ["smart", "fast"]
    original["general_settings"]["custom_auth"] = litellm.CUSTOM_AUTH
    assert composed == original


@pytest.mark.parametrize("auth", ["master_key: os.environ/LITELLM_MASTER_KEY", "custom_auth: mine.auth"])
def test_user_config_with_its_own_auth_runs_untouched(tmp_path: Path, auth: str) -> None:
    source = f"model_list: []\ngeneral_settings:\n  {auth}\n"
    result = boot(tmp_path, source)
    assert result.returncode == 0, result.stderr
    assert result.exec_argv is not None
    assert result.exec_argv[1:] == ["--config", str(tmp_path / "etc" / "config.yaml"), "--port", "8000"]
    assert list(result.runtime.iterdir()) == []


def test_extra_args_reach_litellm(tmp_path: Path) -> None:
    result = boot(tmp_path, "model_list: []\n", "open", "--num_workers", "2")
    assert result.exec_argv is not None
    assert result.exec_argv[-2:] == ["--num_workers", "2"]


@pytest.mark.parametrize(
    ("config_text", "auth", "message"),
    [
        ("model_list: [\n", "open", "cannot load LiteLLM config"),
        ("- a\n- b\n", "open", "top level must be a mapping, got a list"),
        ("", "open", "top level must be a mapping, got an empty document"),
        ("model_list: []\ngeneral_settings: [x]\n", "open", "general_settings must be a mapping"),
        ("model_list: []\n", None, "KAOS_LITELLM_AUTH must be mock or open"),
        ("model_list: []\n", "closed", "KAOS_LITELLM_AUTH must be mock or open"),
    ],
)
def test_bad_input_exits_with_one_clear_line(
    tmp_path: Path, config_text: str, auth: str | None, message: str
) -> None:
    result = boot(tmp_path, config_text, auth)
    assert result.returncode != 0
    assert result.exec_argv is None
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kaos-litellm-boot: ") and message in lines[0]


def test_unwritable_runtime_dir_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = boot(tmp_path, "model_list: []\n", "open", runtime_dir=str(tmp_path / "absent" / "dir"))
    assert result.returncode != 0 and result.exec_argv is None
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kaos-litellm-boot: cannot write the runtime config into")


def test_missing_litellm_command_exits_with_one_clear_line(tmp_path: Path) -> None:
    source = tmp_path / "config.yaml"
    source.write_text("model_list: []\n")
    env = {"PATH": str(tmp_path / "nothing-here"), litellm.ENV_AUTH: "open", litellm.ENV_RUNTIME_DIR: str(tmp_path)}
    argv = [sys.executable, "-c", litellm.BOOT_SCRIPT, "--config", str(source), "--port", "8000"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("kaos-litellm-boot: cannot run litellm")


# --- the auth hook ------------------------------------------------------------------------------------------


class _Roles(enum.StrEnum):
    PROXY_ADMIN = "proxy_admin"
    INTERNAL_USER = "internal_user"


@dataclass
class _Auth:
    api_key: str | None = None
    user_role: _Roles | None = None
    metadata: dict[str, Any] | None = None


def load_hook(monkeypatch: pytest.MonkeyPatch, mode: str, master_key: str = "sk-master") -> types.ModuleType:
    """AUTH_MODULE imported against stand-ins for LiteLLM's types."""
    fake = types.ModuleType("litellm.proxy._types")
    fake.LitellmUserRoles = _Roles  # type: ignore[attr-defined]
    fake.UserAPIKeyAuth = _Auth  # type: ignore[attr-defined]
    for name in ("litellm", "litellm.proxy"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "litellm.proxy._types", fake)
    monkeypatch.setenv(litellm.ENV_AUTH, mode)
    monkeypatch.setenv(litellm.ENV_MASTER_KEY, master_key)
    module = types.ModuleType("kaos_auth")
    exec(compile(litellm.AUTH_MODULE, "kaos_auth.py", "exec"), module.__dict__)
    return module


def call(module: types.ModuleType, api_key: str) -> _Auth:
    result = asyncio.run(module.user_api_key_auth(None, api_key))
    assert isinstance(result, _Auth)
    return result


def test_mock_hook_lets_clients_send_mock_response(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = call(load_hook(monkeypatch, "mock"), "")
    assert auth.metadata == {"allow_client_mock_response": True}
    assert auth.user_role is _Roles.INTERNAL_USER
    assert auth.api_key is None


def test_open_hook_needs_no_key_and_allows_no_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = load_hook(monkeypatch, "open")
    for key in ("", "sk-anything"):
        auth = call(hook, key)
        assert auth.metadata == {}
        assert auth.user_role is _Roles.INTERNAL_USER


def test_master_key_still_means_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = load_hook(monkeypatch, "open", master_key="sk-master")
    assert call(hook, "sk-master").user_role is _Roles.PROXY_ADMIN
    assert call(hook, "sk-master-not").user_role is _Roles.INTERNAL_USER
