"""What a Proxy-mode pod runs: the pinned LiteLLM release, its generated configs and its boot script.

Everything here is pure data or pure functions; the renderer (desired.py) places them in the pod and the
e2e suite runs them against the same LiteLLM release (e2e/litellm-requirements.lock pins it too).
"""

from __future__ import annotations

from typing import Any, Final

# The one place the LiteLLM release is named: the default image and the e2e lock must agree with it
# (e2e/test_litellm_datapath.py fails when they drift).
LITELLM_VERSION: Final = "1.106.12"
DEFAULT_IMAGE: Final = f"docker.io/litellm/litellm:v{LITELLM_VERSION}"

CONFIG_DIR: Final = "/etc/litellm"
CONFIG_FILE: Final = "config.yaml"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE}"
# Writable emptyDir: the composed config and the auth hook live here, since ConfigMap/Secret mounts are
# read-only and LiteLLM loads a custom_auth module from the directory of the config it was given.
RUNTIME_DIR: Final = "/var/run/kaos-litellm"
PORT: Final = 8000

# LiteLLM's own probe endpoints: both answer without a key and without calling any backend
# (plain /health calls every backend, so it must not be a probe).
LIVENESS_PATH: Final = "/health/liveliness"
READINESS_PATH: Final = "/health/readiness"

# Environment the operator sets on the LiteLLM container (a user's proxyConfig.env wins on a clash).
ENV_MASTER_KEY: Final = "LITELLM_MASTER_KEY"
ENV_LOCAL_COST_MAP: Final = "LITELLM_LOCAL_MODEL_COST_MAP"
ENV_AUTH: Final = "KAOS_LITELLM_AUTH"
ENV_RUNTIME_DIR: Final = "KAOS_LITELLM_RUNTIME_DIR"
AUTH_MOCK: Final = "mock"
AUTH_OPEN: Final = "open"
MASTER_KEY_SECRET_KEY: Final = "master-key"

AUTH_MODULE_NAME: Final = "kaos_auth"
CUSTOM_AUTH: Final = f"{AUTH_MODULE_NAME}.user_api_key_auth"

# Answer of a mock deployment to a request without `mock_response`: mock mode has no backend, so LiteLLM
# must never try to reach the provider the model name implies.
MOCK_DEFAULT_RESPONSE: Final = "This is a mock response from a KAOS ModelAPI in mock mode."


def master_key_secret_name(modelapi_name: str) -> str:
    return f"litellm-master-key-{modelapi_name}"


def wildcard_config(api_base: str) -> dict[str, Any]:
    """Any model name goes to api_base; LiteLLM picks the provider from the name the client sends
    ("ollama/smollm2:135m" -> Ollama API with model "smollm2:135m", "gpt-4o" -> OpenAI API)."""
    return {"model_list": [{"model_name": "*", "litellm_params": {"model": "*", "api_base": api_base}}]}


def single_model_config(api_base: str, model: str) -> dict[str, Any]:
    """Only `model` is served (LiteLLM answers 400 for any other name), forwarded to api_base."""
    return {"model_list": [{"model_name": model, "litellm_params": {"model": model, "api_base": api_base}}]}


def mock_config(model: str) -> dict[str, Any]:
    """No backend: the request body's `mock_response` is the answer (the auth hook allows it), else a
    fixed text. custom_llm_provider is set because LiteLLM drops a deployment whose model name names no
    provider it knows ("gpt-4.6-turbo", "my-model"); with a mock answer the provider is never called."""
    params = {"model": model, "custom_llm_provider": "openai", "mock_response": MOCK_DEFAULT_RESPONSE}
    return {"model_list": [{"model_name": model, "litellm_params": params}]}


def defines_own_auth(config: dict[str, Any]) -> bool:
    """Same rule as the boot script: a user config that sets its own auth keeps it, untouched."""
    settings = config.get("general_settings") or {}
    return isinstance(settings, dict) and ("custom_auth" in settings or "master_key" in settings)


# The kaos_auth.py that the boot script writes next to the composed config. LiteLLM calls it for every
# request instead of its key check, so in-cluster clients need no key; the master key still grants admin.
# In mock mode it also marks the caller as allowed to send `mock_response` (LiteLLM strips that field from
# request bodies of callers whose key metadata lacks allow_client_mock_response).
AUTH_MODULE: Final = '''\
"""KAOS ModelAPI auth hook, written by the KAOS boot script: no key needed in-cluster."""
import hmac
import os

from litellm.proxy._types import LitellmUserRoles, UserAPIKeyAuth

_MOCK = os.environ.get("KAOS_LITELLM_AUTH") == "mock"
_MASTER_KEY = os.environ.get("LITELLM_MASTER_KEY", "")


async def user_api_key_auth(request, api_key):
    admin = bool(_MASTER_KEY and api_key) and hmac.compare_digest(str(api_key), _MASTER_KEY)
    role = LitellmUserRoles.PROXY_ADMIN if admin else LitellmUserRoles.INTERNAL_USER
    metadata = {"allow_client_mock_response": True} if _MOCK else {}
    return UserAPIKeyAuth(api_key=api_key or None, user_role=role, metadata=metadata)
'''

# Run by the image's python as `python3 -c BOOT_SCRIPT --config <source> --port <port>`. It composes the
# runtime config (source + our auth hook unless the user's config defines its own auth) and execs litellm.
# Stdlib + pyyaml only: that is what the LiteLLM image is sure to have.
BOOT_SCRIPT: Final = (
    '''\
import argparse, os, sys
import yaml

AUTH_MODULE = @AUTH_MODULE@


def fail(message):
    sys.stderr.write("kaos-litellm-boot: " + message + "\\n")
    sys.exit(2)


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        fail("cannot load LiteLLM config %s: %s" % (path, " ".join(str(e).split())))
    if not isinstance(config, dict):
        got = "an empty document" if config is None else "a " + type(config).__name__
        fail("LiteLLM config %s: top level must be a mapping, got %s" % (path, got))
    settings = config.get("general_settings")
    if settings is not None and not isinstance(settings, dict):
        fail("LiteLLM config %s: general_settings must be a mapping" % path)
    return config


def compose(config, settings):
    runtime = os.environ.get("KAOS_LITELLM_RUNTIME_DIR") or fail("KAOS_LITELLM_RUNTIME_DIR is not set")
    config["general_settings"] = dict(settings, custom_auth="kaos_auth.user_api_key_auth")
    path = os.path.join(runtime, "config.yaml")
    try:
        with open(os.path.join(runtime, "kaos_auth.py"), "w", encoding="utf-8") as f:
            f.write(AUTH_MODULE)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
    except OSError as e:
        fail("cannot write the runtime config into %s: %s" % (runtime, e))
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", required=True)
    args, rest = parser.parse_known_args()
    mode = os.environ.get("KAOS_LITELLM_AUTH", "")
    if mode not in ("mock", "open"):
        fail("KAOS_LITELLM_AUTH must be mock or open, got %r" % mode)
    config = load(args.config)
    settings = config.get("general_settings") or {}
    path = args.config
    if "custom_auth" not in settings and "master_key" not in settings:
        path = compose(config, settings)
    sys.stdout.flush()
    try:
        os.execvp("litellm", ["litellm", "--config", path, "--port", args.port, *rest])
    except OSError as e:
        fail("cannot run litellm: %s" % e)

main()
'''
).replace("@AUTH_MODULE@", repr(AUTH_MODULE))
