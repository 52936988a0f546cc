"""A sample of what the builder makes from generated ModelAPIs passes the API server's server-side dry-run:
every child of a spec without a podSpec override is a valid object (an override may break the pod; the
operator then reports InvalidPodSpec, see test_controller.py)."""

from __future__ import annotations

import json

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings

from e2e.operator_process import Kubectl
from kaos_modelapi import desired
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.settings import GatewayRef, Settings
from tests.properties import modelapis

pytestmark = pytest.mark.cluster
SETTINGS = Settings(gateway=GatewayRef("shared", "gateway-system"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(obj=modelapis())
def test_built_children_pass_server_side_dry_run(kubectl: Kubectl, namespace: str, obj: dict[str, object]) -> None:
    obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}  # type: ignore[dict-item]
    spec = obj["spec"]
    assert isinstance(spec, dict)
    spec.pop("podSpec", None)
    try:
        built = desired.build(ModelAPI.model_validate(obj), SETTINGS, "1")
    except (pydantic.ValidationError, desired.SpecError):
        return  # refused before any child exists
    items = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(built.children)})
    done = kubectl.run("apply", "--server-side", "--dry-run=server", "--field-manager", "kaos-modelapi",
                       "-f", "-", stdin=items, check=False)
    assert done.returncode == 0, f"{done.stderr}\n{items[:3000]}"
