"""Strategic merge of the spec.podSpec override, offline.

The shared corpus (tests/smp_corpus.yaml) is also replayed against a real API server by
e2e/test_smp_differential.py; the tests below it cover behaviour the corpus cannot show on one base.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaos_modelapi.podspec_schema import pod_spec_schema
from kaos_modelapi.smp import StrategicMergeError, merge_pod_spec, strategic_merge

CORPUS: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "smp_corpus.yaml").read_text())
BASE: dict[str, Any] = CORPUS["base"]
CASES: list[dict[str, Any]] = CORPUS["cases"]


def test_corpus_is_well_formed() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        assert ("expected" in case) != ("error" in case), case["name"]
        assert set(case) <= {"name", "description", "override", "expected", "error", "server_differs"}


@pytest.mark.parametrize("case", [c for c in CASES if "expected" in c], ids=lambda c: c["name"])
def test_corpus_merges(case: dict[str, Any]) -> None:
    assert merge_pod_spec(BASE, case["override"]) == case["expected"]


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=lambda c: c["name"])
def test_corpus_errors(case: dict[str, Any]) -> None:
    with pytest.raises(StrategicMergeError) as raised:
        merge_pod_spec(BASE, case["override"])
    assert str(raised.value) == case["error"]
    assert raised.value.path == case["error"].split(": ", 1)[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_inputs_are_not_modified(case: dict[str, Any]) -> None:
    base, override = copy.deepcopy(BASE), copy.deepcopy(case["override"])
    with contextlib.suppress(StrategicMergeError):
        merge_pod_spec(base, override)
    assert base == BASE
    assert override == case["override"]


def test_result_shares_nothing_with_inputs() -> None:
    override: dict[str, Any] = {"containers": [{"name": "model-api", "resources": {"limits": {"cpu": "1"}}}]}
    merged = merge_pod_spec(BASE, override)
    merged["containers"][0]["resources"]["limits"]["cpu"] = "99"
    merged["volumes"][0]["name"] = "changed"
    assert override["containers"][0]["resources"]["limits"]["cpu"] == "1"
    assert BASE["volumes"][0]["name"] == "models"


def test_empty_override_is_identity() -> None:
    assert merge_pod_spec(BASE, {}) == BASE


def test_strategic_merge_takes_any_schema_node() -> None:
    requirements = pod_spec_schema().prop("containers")
    assert requirements is not None
    container = requirements.items()
    assert container is not None
    merged = strategic_merge({"name": "a", "env": [{"name": "X", "value": "1"}]}, {"env": [{"name": "Y"}]}, container)
    assert merged == {"name": "a", "env": [{"name": "Y"}, {"name": "X", "value": "1"}]}


def test_error_path_defaults_to_root_marker() -> None:
    with pytest.raises(StrategicMergeError, match=r"^\$\.containers\[0\]: merge key 'name' missing$"):
        strategic_merge({"containers": []}, {"containers": [{"image": "x"}]}, pod_spec_schema())


def test_top_level_delete_empties_the_spec() -> None:
    assert merge_pod_spec(BASE, {"$patch": "delete"}) == {}


def test_top_level_replace() -> None:
    spec = {"containers": [{"name": "only", "image": "busybox:1.36"}]}
    assert merge_pod_spec(BASE, {"$patch": "replace", **spec}) == spec


def test_delete_directive_on_existing_struct_leaves_it_empty() -> None:
    # Upstream turns `$patch: delete` on an existing map into {} rather than removing the key.
    merged = merge_pod_spec(BASE, {"securityContext": {"$patch": "delete"}})
    assert merged["securityContext"] == {}


def test_delete_directive_on_absent_struct_sets_nothing() -> None:
    assert "affinity" not in merge_pod_spec(BASE, {"affinity": {"$patch": "delete"}})


def test_new_list_keeps_duplicates_as_written() -> None:
    # As upstream: a list the original lacks is stored as given (only directive elements go).
    override = {"containers": [{"name": "metrics-exporter", "env": [{"name": "A"}, {"name": "A", "value": "2"}]}]}
    merged = merge_pod_spec(BASE, override)
    assert merged["containers"][1]["env"] == [{"name": "A"}, {"name": "A", "value": "2"}]


def test_repeated_patch_items_merge_into_one() -> None:
    override = {"containers": [{"name": "model-api", "image": "a:1"}, {"name": "model-api", "args": ["x"]}]}
    model_api = merge_pod_spec(BASE, override)["containers"][0]
    assert (model_api["image"], model_api["args"]) == ("a:1", ["x"])


def test_directives_inside_new_content_are_resolved() -> None:
    # Upstream would keep the `$patch` element as an env var named "" or drop the map; here it applies
    # to nothing, so no part of the override is lost or turned into something else.
    override = {
        "containers": [
            {
                "name": "sidecar",
                "env": [{"name": "A", "value": "1"}, {"name": "B", "$patch": "delete"}],
                "resources": {"$patch": "replace", "limits": {"cpu": "1"}},
                "securityContext": {"runAsUser": None, "runAsGroup": 1},
            }
        ]
    }
    sidecar = merge_pod_spec(BASE, override)["containers"][0]
    assert sidecar == {
        "name": "sidecar",
        "env": [{"name": "A", "value": "1"}],
        "resources": {"limits": {"cpu": "1"}},
        "securityContext": {"runAsGroup": 1},
    }


def test_merge_marker_in_list_is_a_no_op() -> None:
    merged = merge_pod_spec(BASE, {"containers": [{"$patch": "merge"}]})
    assert merged == BASE


def test_merge_directive_on_list_item_merges_it() -> None:
    override = {"containers": [{"name": "model-api", "$patch": "merge", "image": "b:2"}]}
    assert merge_pod_spec(BASE, override)["containers"][0]["image"] == "b:2"


def test_list_replace_marker_with_key_still_replaces_the_list() -> None:
    # What the CRD stores for `{$patch: replace}` once it defaults the missing name to "".
    override = {"imagePullSecrets": [{"$patch": "replace", "name": ""}, {"name": "b"}]}
    base = {**BASE, "imagePullSecrets": [{"name": "a"}]}
    assert merge_pod_spec(base, override)["imagePullSecrets"] == [{"name": "b"}]


def test_set_element_order_without_patch_list_reorders() -> None:
    order = [{"name": "metrics-exporter"}, {"name": "model-api"}]
    merged = merge_pod_spec(BASE, {"$setElementOrder/containers": order})
    assert [c["name"] for c in merged["containers"]] == ["metrics-exporter", "model-api"]


def test_set_element_order_must_follow_the_patch_order() -> None:
    override = {
        "$setElementOrder/containers": [{"name": "model-api"}, {"name": "x"}],
        "containers": [{"name": "x"}, {"name": "model-api"}],
    }
    with pytest.raises(StrategicMergeError, match=r"^spec\.podSpec\.\$setElementOrder/containers: "):
        merge_pod_spec(BASE, override)


def test_set_element_order_on_atomic_list_is_an_error() -> None:
    with pytest.raises(StrategicMergeError, match="not a list that merges"):
        merge_pod_spec(BASE, {"$setElementOrder/tolerations": [{"key": "x"}]})


def test_primitive_merge_list_unions_and_orders() -> None:
    # ObjectMeta.finalizers is the one list of scalars with patch strategy merge under PodSpec.
    ephemeral = {"volumeClaimTemplate": {"metadata": {"finalizers": ["a", "b"]}, "spec": {}}}
    base = {"volumes": [{"name": "scratch", "ephemeral": ephemeral}]}
    patch_template = {
        "metadata": {
            "finalizers": ["c", "a"],
            "$deleteFromPrimitiveList/finalizers": ["b"],
        }
    }
    override = {"volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": patch_template}}]}
    merged = merge_pod_spec(base, override)
    finalizers = merged["volumes"][0]["ephemeral"]["volumeClaimTemplate"]["metadata"]["finalizers"]
    assert finalizers == ["c", "a"]


def test_delete_from_primitive_list_runs_after_the_merge() -> None:
    override = {"containers": [{"name": "model-api", "args": ["a", "b"], "$deleteFromPrimitiveList/args": ["a"]}]}
    assert merge_pod_spec(BASE, override)["containers"][0]["args"] == ["b"]


def test_unknown_fields_pass_through() -> None:
    # A field newer than the vendored schema is kept (merged without patch metadata), not dropped.
    merged = merge_pod_spec(BASE, {"futureField": {"x": 1}, "containers": [{"name": "model-api", "newer": [1]}]})
    assert merged["futureField"] == {"x": 1}
    assert merged["containers"][0]["newer"] == [1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"$bogus": 1}, r"^spec\.podSpec\.\$bogus: unknown directive$"),
        ({"containers": [1]}, r"^spec\.podSpec\.containers\[0\]: expected object, got number$"),
        ({"containers": [None]}, r"^spec\.podSpec\.containers\[0\]: expected object, got null$"),
        ({"terminationGracePeriodSeconds": "60"}, r"terminationGracePeriodSeconds: expected integer, got string$"),
        ({"hostNetwork": 1}, r"hostNetwork: expected boolean, got number$"),
        ({"priority": True}, r"priority: expected integer, got boolean$"),
        ({"containers": [{"name": "model-api", "resources": {"limits": {"cpu": []}}}]}, r"expected"),
        ({"containers": [{"name": "model-api", "$deleteFromPrimitiveList/args": "x"}]}, r"must be a list"),
        ({"containers": [{"name": "model-api", "$deleteFromPrimitiveList/env": ["x"]}]}, r"not a list of primitives"),
        ({"$deleteFromPrimitiveList/nodeName": ["x"]}, r"'nodeName' is not a list field"),
        ({"volumes": [{"name": "models", "$retainKeys": "name"}]}, r"must be a list of field names"),
        ({"containers": [{"name": {"a": 1}}]}, r"containers\[0\]: merge key 'name' must be a scalar$"),
        ({"containers": [{"name": 5}]}, r"containers\[0\]\.name: expected string, got number$"),
        ({"containers": [{"$patch": "bogus"}]}, r"^spec\.podSpec\.containers\[0\]: unknown \$patch directive"),
    ],
)
def test_errors_name_the_path(override: dict[str, Any], message: str) -> None:
    with pytest.raises(StrategicMergeError, match=message):
        merge_pod_spec(BASE, override)


def test_quantities_accept_numbers_and_strings() -> None:
    override = {"containers": [{"name": "model-api", "resources": {"limits": {"cpu": 1.5, "nvidia.com/gpu": 1}}}]}
    limits = merge_pod_spec(BASE, override)["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "4Gi", "cpu": 1.5, "nvidia.com/gpu": 1}


def test_int_or_string_accepts_both() -> None:
    probe = {"httpGet": {"port": 8080}}
    merged = merge_pod_spec(BASE, {"containers": [{"name": "model-api", "readinessProbe": probe}]})
    assert merged["containers"][0]["readinessProbe"]["httpGet"] == {"path": "/", "port": 8080}


def test_scalars_compare_like_json_numbers() -> None:
    # 9100 and 9100.0 are the same JSON number, so the port merges instead of being added.
    override = {"containers": [{"name": "metrics-exporter", "ports": [{"containerPort": 9100.0, "name": "m"}]}]}
    ports = merge_pod_spec(BASE, override)["containers"][1]["ports"]
    assert ports == [{"name": "m", "containerPort": 9100.0}]
