"""Properties of the pure core, for any input: the builder returns children or a clear spec error, the strategic
merge raises only its own error and never changes its inputs, and the status is always well-formed."""

from __future__ import annotations

import copy
import json
from typing import Any

import pydantic
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaos_modelapi import desired, litellm, ollama, status
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.settings import GatewayRef, Settings
from kaos_modelapi.smp import StrategicMergeError, merge_pod_spec
from tests.properties import modelapis, pod_specs

SETTINGS = st.sampled_from([Settings(), Settings(gateway=GatewayRef("shared", "gateway-system"))])
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROFILE
@given(obj=modelapis(), s=SETTINGS)
def test_the_builder_returns_children_or_a_spec_error_and_nothing_else(obj: dict[str, Any], s: Settings) -> None:
    try:
        m = ModelAPI.model_validate(obj)
    except pydantic.ValidationError:
        return  # refused as the API server would (the same rules, written once)
    before = copy.deepcopy(obj)
    try:
        built = desired.build(m, s, "7")
    except desired.SpecError as e:
        assert e.reason and e.message
        return
    assert ModelAPI.model_validate(before) == m  # the builder does not change the model
    kinds = [c["kind"] for c in built.children]
    assert kinds.count("Deployment") == kinds.count("Service") == 1
    deployment = next(c for c in built.children if c["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert any(c.get("name") == desired.CONTAINER for c in pod.get("containers") or []) or m.spec.podSpec
    for child in built.children:
        assert child["metadata"]["ownerReferences"][0]["uid"] == m.metadata.uid
        assert child["metadata"]["labels"][desired.MANAGED_BY_LABEL] == desired.MANAGED_BY
    for init in pod.get("initContainers") or []:
        # The model reaches the shell only as data (env). Only Hosted mode has the pull script: in Proxy mode an
        # override may add an init container of that name with no command at all.
        if m.spec.mode == "Hosted" and init.get("name") == desired.INIT_CONTAINER:
            assert init["command"] == ["/bin/sh", "-c", ollama.PULL_SCRIPT]


@PROFILE
@given(obj=modelapis(), s=SETTINGS)
def test_the_status_is_always_well_formed(obj: dict[str, Any], s: Settings) -> None:
    try:
        m = ModelAPI.model_validate(obj)
    except pydantic.ValidationError:
        return
    try:
        built: desired.Desired | desired.SpecError = desired.build(m, s)
    except desired.SpecError as e:
        built = e
    st_ = status.compute(m, built, status.Observed(), "2026-11-27T00:00:00Z")
    assert st_["phase"] in ("Pending", "Ready", "Failed")
    assert [c["type"] for c in st_["conditions"]] == ["Ready"]
    assert st_["conditions"][0]["reason"].isidentifier()


@PROFILE
@given(base=pod_specs, patch=pod_specs)
def test_the_strategic_merge_raises_only_its_own_error_and_leaves_its_inputs(
        base: dict[str, Any], patch: dict[str, Any]) -> None:
    base_before, patch_before = copy.deepcopy(base), copy.deepcopy(patch)
    try:
        merge_pod_spec(base, patch)
    except StrategicMergeError as e:
        assert str(e)
    assert base == base_before and patch == patch_before


@PROFILE
@given(base=pod_specs)
def test_an_empty_patch_changes_nothing_but_directives(base: dict[str, Any]) -> None:
    try:
        merged = merge_pod_spec(base, {})
    except StrategicMergeError:
        return
    assert merged == merge_pod_spec(merged, {})  # idempotent


# Printable ASCII with YAML's indicators and words (the fast emitter's strings), or any text at all.
CONFIG_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=90) \
    | st.text(" ab:-#'\"!&*?|>%@`,[]{}~\t\n0123456789.eE+_/", max_size=90) | st.text(max_size=90)


@settings(max_examples=600, deadline=None)
@given(model=CONFIG_TEXT, api_base=CONFIG_TEXT)
def test_a_generated_config_is_the_text_the_pure_python_emitter_writes(model: str, api_base: str) -> None:
    """Whichever emitter wrote it: a different text would roll every LiteLLM pod after an upgrade."""
    for config in (litellm.single_model_config(api_base, model), litellm.mock_config(model),
                   litellm.wildcard_config(api_base)):
        assert desired._config_yaml(json.dumps(config)) == yaml.safe_dump(config, sort_keys=False)
