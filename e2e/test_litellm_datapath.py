"""Proxy mode's data path: the operator's rendered pods, run as local LiteLLM processes (the pinned release,
from e2e/.venv-litellm) by e2e/pod.py, answering real requests from the openai client that carry no key.

Every variant's pod starts once per module, all at the same time (LiteLLM takes 7+ s to start), and each
test waits for the one it needs. Backends are loopback stubs (e2e/stub_backend.py) that record what
LiteLLM forwarded.
"""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml

from e2e.pod import E2E_DIR, LITELLM_BIN, Pod, PodError, Process, wait_for
from e2e.stub_backend import REPLY, Backend, running_backend
from kaos_modelapi import litellm
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.desired import CONFIG_HASH_ANNOTATION, CONTAINER, Desired, build
from kaos_modelapi.settings import Settings

Obj = dict[str, Any]

READY_TIMEOUT = 300.0  # seven LiteLLM processes start at once on two (shared) cores
OPENAI_KEY = "sk-from-the-secret-" + secrets.token_hex(4)
USER_MASTER_KEY = "sk-user-master-" + secrets.token_hex(4)


# --- rendering -------------------------------------------------------------------------------------------


def modelapi(name: str, proxy_config: Obj) -> Obj:
    return {
        "apiVersion": "kaos.tools/v1alpha1",
        "kind": "ModelAPI",
        "metadata": {"name": name, "namespace": "e2e", "uid": f"uid-{name}"},
        "spec": {"mode": "Proxy", "proxyConfig": proxy_config},
    }


def secret(name: str, **string_data: str) -> Obj:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "e2e"}, "data": data}


def secret_env(name: str, secret_name: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


def fill_generated_keys(obj: Obj, built: Desired) -> Obj:
    """What the apply layer does when it creates the master-key Secret: a random value for the named key."""
    key = {g.secret: g.key for g in built.generated}.get(obj["metadata"]["name"])
    if obj["kind"] != "Secret" or key is None:
        return obj
    value = base64.b64encode(secrets.token_urlsafe(32).encode()).decode()
    return {**obj, "data": {key: value}}


def render(spec: Obj) -> list[Obj]:
    built = build(ModelAPI.model_validate(spec), Settings())
    return [fill_generated_keys(o, built) for o in built.children]


def deployment(children: list[Obj]) -> Obj:
    (found,) = [o for o in children if o["kind"] == "Deployment"]
    return found


def config_hash(children: list[Obj]) -> str:
    return str(deployment(children)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])


def multi_model_config(api_base: str, fast_name: str = "fast") -> str:
    """The seed document's multi-model routing example, pointed at the stub backend."""
    return yaml.safe_dump(
        {
            "model_list": [
                {"model_name": fast_name, "litellm_params": {"model": "ollama/smollm2:135m", "api_base": api_base}},
                {
                    "model_name": "smart",
                    "litellm_params": {
                        "model": "gpt-4o",
                        "api_key": "os.environ/OPENAI_API_KEY",
                        "api_base": api_base,
                    },
                },
            ]
        },
        sort_keys=False,
    )


# --- the fleet of running pods ------------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    children: list[Obj]
    user_objects: list[Obj]
    backend: Backend | None
    process: Process

    def ready(self) -> Process:
        self.process.wait_ready(READY_TIMEOUT)
        return self.process


def keyless_client(process: Process) -> openai.OpenAI:
    """An openai client that sends no credentials at all: the Authorization header it would add is removed
    before each request leaves, as an in-cluster agent without a key would call."""

    def strip_key(request: httpx2.Request) -> None:
        request.headers.pop("Authorization", None)
        assert not any(h.lower() in ("authorization", "x-api-key") for h in request.headers)

    http = httpx2.Client(event_hooks={"request": [strip_key]})
    return openai.OpenAI(base_url=f"{process.url()}/v1", api_key="unused", http_client=http, max_retries=0)


def ask(client: openai.OpenAI, model: str, text: str, **extra: Any) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=extra or None
    )
    return response.choices[0].message.content or ""


@pytest.fixture(scope="module")
def litellm_venv() -> Path:
    # Idempotent and fast when the venv already holds the locked set; CI runs it beforehand too.
    subprocess.run(["bash", str(E2E_DIR / "install-litellm.sh")], check=True, timeout=900)
    return LITELLM_BIN


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with running_backend() as b:
        yield b


def variants(url: str) -> dict[str, tuple[Obj, list[Obj]]]:
    """name -> (ModelAPI, the user's own objects it references)."""
    openai_secret = secret("api-secrets", **{"openai-key": OPENAI_KEY})
    openai_env = [secret_env("OPENAI_API_KEY", "api-secrets", "openai-key")]
    own_auth = multi_model_config(url) + "general_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n"
    return {
        "mock": (modelapi("mock-api", {"model": "gpt-4.6-turbo"}), []),
        "wildcard": (modelapi("wild", {"apiBase": url, "env": openai_env}), [openai_secret]),
        "single": (modelapi("single", {"apiBase": url, "model": "ollama/smollm2:135m"}), []),
        "from-string": (
            modelapi("multi-model", {"configYaml": {"fromString": multi_model_config(url)}, "env": openai_env}),
            [openai_secret],
        ),
        "from-secret": (
            modelapi(
                "multi-secret",
                {
                    "configYaml": {"fromSecretKeyRef": {"name": "litellm-config", "key": "config.yaml"}},
                    "env": openai_env,
                },
            ),
            [openai_secret, secret("litellm-config", **{"config.yaml": multi_model_config(url)})],
        ),
        "own-auth": (
            modelapi(
                "own-auth",
                {
                    "configYaml": {"fromString": own_auth},
                    "env": [*openai_env, secret_env("LITELLM_MASTER_KEY", "user-key", "key")],
                },
            ),
            [openai_secret, secret("user-key", key=USER_MASTER_KEY)],
        ),
        # The from-string ModelAPI after an edit of its config: the rolled pod.
        "from-string-v2": (
            modelapi(
                "multi-model",
                {"configYaml": {"fromString": multi_model_config(url, "quick")}, "env": openai_env},
            ),
            [openai_secret],
        ),
    }


@pytest.fixture(scope="module")
def fleet(litellm_venv: Path, backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    dict[str, Running]
]:
    running: dict[str, Running] = {}
    try:
        for name, (spec, user_objects) in variants(backend.url).items():
            children = render(spec)
            pod = Pod.from_objects([*children, *user_objects], tmp_path_factory.mktemp(name))
            running[name] = Running(name, children, user_objects, backend, pod.start(CONTAINER))
        yield running
    finally:
        errors = []
        for r in running.values():
            try:
                r.process.stop()
            except PodError as e:
                errors.append(f"{r.name}: {e}")
        assert not errors, errors


def new_requests(backend: Backend, before: int) -> list[Any]:
    return [s for s in backend.seen[before:] if s.path != "/api/show"]


# --- the pinned release ------------------------------------------------------------------------------------


def test_pinned_release_is_the_locked_and_installed_one(litellm_venv: Path) -> None:
    lock = (E2E_DIR / "litellm-requirements.lock").read_text()
    (locked,) = re.findall(r"^litellm==(\S+)$", lock, flags=re.MULTILINE)
    assert locked == litellm.LITELLM_VERSION
    wanted = (E2E_DIR / "litellm-requirements.in").read_text().split()
    assert f"litellm[proxy]=={litellm.LITELLM_VERSION}" in wanted
    installed = subprocess.run(
        [str(litellm_venv / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()
    assert installed == litellm.LITELLM_VERSION
    assert litellm.DEFAULT_IMAGE.endswith(f":v{litellm.LITELLM_VERSION}")
    assert Settings().litellm_image == litellm.DEFAULT_IMAGE


# --- probes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mock", "wildcard", "single", "from-string", "from-secret", "own-auth"])
def test_probe_paths_answer_200(fleet: dict[str, Running], name: str) -> None:
    process = fleet[name].ready()
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert process.probe(kind) == 200, kind


# --- mock -------------------------------------------------------------------------------------------------


def test_mock_returns_the_requested_text_without_credentials_or_backend(fleet: dict[str, Running]) -> None:
    client = keyless_client(fleet["mock"].ready())
    text = "exactly this text, with ünïcode\nand a second line"
    assert ask(client, "gpt-4.6-turbo", "hello", mock_response=text) == text
    assert ask(client, "gpt-4.6-turbo", "hello", mock_response="another answer") == "another answer"


def test_mock_streams_the_requested_text(fleet: dict[str, Running]) -> None:
    client = keyless_client(fleet["mock"].ready())
    stream = client.chat.completions.create(
        model="gpt-4.6-turbo",
        messages=[{"role": "user", "content": "hello"}],
        extra_body={"mock_response": "streamed, word by word"},
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "streamed, word by word"


def test_mock_without_mock_response_answers_the_default_text(fleet: dict[str, Running]) -> None:
    client = keyless_client(fleet["mock"].ready())
    assert ask(client, "gpt-4.6-turbo", "hello") == litellm.MOCK_DEFAULT_RESPONSE


def test_mock_serves_only_its_model(fleet: dict[str, Running]) -> None:
    client = keyless_client(fleet["mock"].ready())
    with pytest.raises(openai.BadRequestError):
        ask(client, "gpt-4o", "hello", mock_response="x")


# --- wildcard and single model ---------------------------------------------------------------------------


def test_wildcard_forwards_any_model_name_to_the_backend(fleet: dict[str, Running], backend: Backend) -> None:
    client = keyless_client(fleet["wildcard"].ready())

    before = len(backend.seen)
    assert ask(client, "ollama/smollm2:135m", "first question") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/api/generate", "smollm2:135m")
    assert "first question" in seen.body["prompt"]

    before = len(backend.seen)
    assert ask(client, "ollama_chat/llama3.2:1b", "second question") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/api/chat", "llama3.2:1b")
    assert [(m["role"], m["content"]) for m in seen.body["messages"]] == [("user", "second question")]

    # An OpenAI-style name takes the OpenAI API to the same base URL, with the key from the user's Secret.
    before = len(backend.seen)
    assert ask(client, "gpt-4o", "third question") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/chat/completions", "gpt-4o")
    assert seen.body["messages"] == [{"role": "user", "content": "third question"}]
    assert seen.headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_single_model_forwards_its_model(fleet: dict[str, Running], backend: Backend) -> None:
    client = keyless_client(fleet["single"].ready())
    before = len(backend.seen)
    assert ask(client, "ollama/smollm2:135m", "only question") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/api/generate", "smollm2:135m")
    assert "only question" in seen.body["prompt"]


def test_single_model_refuses_another_model(fleet: dict[str, Running], backend: Backend) -> None:
    client = keyless_client(fleet["single"].ready())
    before = len(backend.seen)
    for other in ("gpt-4o", "ollama/llama2"):
        with pytest.raises(openai.BadRequestError):
            ask(client, other, "hello")
    assert new_requests(backend, before) == []


# --- the user's own config -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["from-string", "from-secret"])
def test_user_config_routes_each_model_with_env_from_a_secret(
    fleet: dict[str, Running], backend: Backend, name: str
) -> None:
    client = keyless_client(fleet[name].ready())

    before = len(backend.seen)
    assert ask(client, "fast", "to the small model") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/api/generate", "smollm2:135m")
    assert "to the small model" in seen.body["prompt"]

    before = len(backend.seen)
    assert ask(client, "smart", "to the big model") == REPLY
    (seen,) = new_requests(backend, before)
    assert (seen.path, seen.body["model"]) == ("/chat/completions", "gpt-4o")
    assert seen.body["messages"] == [{"role": "user", "content": "to the big model"}]
    # api_key: os.environ/OPENAI_API_KEY, the variable coming from the user's Secret.
    assert seen.headers["authorization"] == f"Bearer {OPENAI_KEY}"

    # (LiteLLM also accepts a deployment's own model, e.g. "gpt-4o" here; a name in neither is refused.)
    with pytest.raises(openai.BadRequestError):
        ask(client, "claude-3-haiku", "not in the model_list")


def test_config_from_a_secret_is_mounted_not_copied(fleet: dict[str, Running]) -> None:
    children = fleet["from-secret"].children
    assert not [o for o in children if o["kind"] == "ConfigMap"]
    # The operator never read the Secret: nothing of the config's content is in what it rendered.
    assert "smollm2" not in yaml.safe_dump(children)


def test_user_config_with_its_own_auth_keeps_it(fleet: dict[str, Running], backend: Backend) -> None:
    running = fleet["own-auth"]
    process = running.ready()
    # The user's LITELLM_MASTER_KEY wins: the operator creates no key of its own.
    assert not [o for o in running.children if o["kind"] == "Secret"]
    with pytest.raises(openai.APIStatusError) as refused:
        ask(keyless_client(process), "fast", "no key")
    assert refused.value.status_code in (401, 403, 500)
    with_key = openai.OpenAI(base_url=f"{process.url()}/v1", api_key=USER_MASTER_KEY, max_retries=0)
    before = len(backend.seen)
    assert ask(with_key, "fast", "with the user's key") == REPLY
    assert [s.body["model"] for s in new_requests(backend, before)] == ["smollm2:135m"]


# --- config changes roll the pods ------------------------------------------------------------------------


def test_config_change_changes_the_pod_template_and_the_new_pod_serves_it(
    fleet: dict[str, Running], backend: Backend
) -> None:
    old, new = fleet["from-string"], fleet["from-string-v2"]
    assert deployment(old.children)["metadata"]["name"] == deployment(new.children)["metadata"]["name"]
    assert config_hash(old.children) != config_hash(new.children)
    # Rendering is deterministic: the same spec gives the same hash (no spurious rollouts).
    spec, _ = variants(backend.url)["from-string"]
    assert config_hash(render(spec)) == config_hash(old.children)

    old_client, new_client = keyless_client(old.ready()), keyless_client(new.ready())
    assert ask(old_client, "fast", "old") == REPLY
    assert ask(new_client, "quick", "new") == REPLY
    with pytest.raises(openai.BadRequestError):
        ask(new_client, "fast", "gone")
    with pytest.raises(openai.BadRequestError):
        ask(old_client, "quick", "not yet")


# --- a config that does not parse ------------------------------------------------------------------------


def test_unparsable_config_from_a_secret_exits_with_one_clear_line(
    litellm_venv: Path, tmp_path: Path
) -> None:
    ref = {"configYaml": {"fromSecretKeyRef": {"name": "broken", "key": "config.yaml"}}}
    children = render(modelapi("broken", ref))
    pod = Pod.from_objects([*children, secret("broken", **{"config.yaml": "model_list: [\n"})], tmp_path)
    process = pod.start(CONTAINER)
    try:
        wait_for("the boot script to exit", lambda: not process.alive(), timeout=60)
        lines = process.output().strip().splitlines()
        assert process.popen.returncode != 0
        assert len(lines) == 1, lines
        assert lines[0].startswith("kaos-litellm-boot: cannot load LiteLLM config")
        assert "config.yaml" in lines[0]
    finally:
        process.stop()


def test_a_missing_required_secret_is_refused_like_the_kubelet(tmp_path: Path) -> None:
    spec = modelapi("no-secret", {"model": "m", "env": [secret_env("X", "absent", "k")]})
    pod = Pod.from_objects(render(spec), tmp_path)
    with pytest.raises(PodError, match="Secret 'absent' not found"):
        pod.start(CONTAINER)
