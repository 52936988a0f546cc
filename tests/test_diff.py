"""The no-write diff: server defaults and other managers' fields never cause an apply; drift does."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kaos_modelapi import diff
from kaos_modelapi.diff import is_subset, metadata_only, needs_apply, quantity, strategy_handover

DESIRED: dict[str, Any] = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "d", "namespace": "ns", "labels": {"app": "modelapi"}},
    "spec": {"template": {"spec": {"containers": [{
        "name": "model-api", "image": "img:1", "args": ["--port", "8000"],
        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        "resources": {"limits": {"cpu": "1000m", "memory": "1Gi"}},
    }], "volumes": [{"name": "v", "emptyDir": {}}]}}},
}


def live() -> dict[str, Any]:
    """What the server returns: defaults added, other managers' additions, normalised quantities."""
    obj = copy.deepcopy(DESIRED)
    obj["metadata"] |= {"uid": "x", "resourceVersion": "9", "annotations": {"team": "ml"}}
    obj["spec"]["replicas"] = 3
    container = obj["spec"]["template"]["spec"]["containers"][0]
    container |= {"imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log"}
    container["resources"]["limits"]["cpu"] = "1"
    obj["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "other"})
    obj["status"] = {"replicas": 3}
    return obj


def test_absent_object_needs_apply() -> None:
    assert needs_apply(DESIRED, None)


def test_defaults_foreign_fields_and_normalised_quantities_need_no_apply() -> None:
    assert not needs_apply(DESIRED, live())


def test_drift_in_what_we_own_needs_apply() -> None:
    for mutate in (
        lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image="evil"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["env"][0].update(value="9"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["env"].pop(1),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["args"].append("--debug"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort=9),
        lambda o: o["metadata"]["labels"].pop("app"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="2Gi"),
    ):
        obj = live()
        mutate(obj)
        assert needs_apply(DESIRED, obj)


def test_reordered_env_needs_apply() -> None:
    obj = live()
    obj["spec"]["template"]["spec"]["containers"][0]["env"].reverse()
    assert needs_apply(DESIRED, obj)


def test_quantities_compare_by_value() -> None:
    assert quantity("1000m") == quantity("1") == quantity("1.0")
    assert quantity("1Gi") == quantity("1024Mi")
    assert quantity("abc") is None
    assert is_subset({"cpu": "500m"}, {"cpu": "0.5"})
    assert not is_subset({"x": True}, {"x": 1})


def test_a_hash_that_reads_as_a_huge_number_is_a_plain_string() -> None:
    # A config hash of digits and one "e" reads as 9e1560928115242: multiplying it overflowed, every reconcile
    # of that ModelAPI failed, and its pods never rolled (found by make bench at N=100).
    assert quantity("09e1560928115242") is None
    old = {"metadata": {"annotations": {"kaos.tools/config-hash": "09e1560928115242"}}}
    new = {"metadata": {"annotations": {"kaos.tools/config-hash": "17255011668e0006"}}}
    assert needs_apply(new, old) and needs_apply(old, new)
    assert not needs_apply(old, old)


def test_metadata_only_never_carries_content() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {"k": "v"},
              "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "b"}, "uid": "u"}}
    assert metadata_only(secret) == {"apiVersion": "v1", "kind": "Secret",
                                     "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "b"}}}


def _deployment(strategy: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"replicas": 1, "template": {"spec": {"containers": [{"name": "c"}]}}}
    if strategy is not None:
        spec["strategy"] = strategy
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": spec}


DEFAULTED = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}


def test_a_move_to_recreate_first_takes_the_defaulted_rolling_update_parameters_as_ours() -> None:
    """Server-side apply cannot drop parameters no manager applied, and Recreate beside them is invalid
    (measured on the real API server): they are applied as ours first, so the next apply removes them."""
    wanted = _deployment({"type": "Recreate"})
    step = strategy_handover(wanted, _deployment(DEFAULTED))
    assert step is not None
    assert step["spec"]["strategy"] == DEFAULTED
    assert step["spec"]["template"] == wanted["spec"]["template"]  # the same pods: no roll
    assert wanted["spec"]["strategy"] == {"type": "Recreate"}  # untouched


def test_no_handover_when_none_is_needed() -> None:
    recreate = _deployment({"type": "Recreate"})
    assert strategy_handover(recreate, None) is None  # created with Recreate: nothing is defaulted
    assert strategy_handover(recreate, _deployment({"type": "Recreate"})) is None
    assert strategy_handover(_deployment(DEFAULTED), _deployment(DEFAULTED)) is None
    assert strategy_handover(_deployment(None), _deployment({"type": "Recreate"})) is None
    assert strategy_handover({"kind": "Service", "spec": {}}, {"kind": "Service", "spec": {}}) is None


# --- the diff against a plain statement of its rule (the reference: short, slow, obviously right) ----------


def _reference_subset(want: Any, have: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _reference_subset(v, have[k]) for k, v in want.items() if v is not None)
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        key = next((k for k in ("name", "mountPath", "containerPort", "type")
                    if want and all(isinstance(i, dict) for i in want) and all(k in i for i in want)), None)
        if key is None:
            return len(want) == len(have) and all(_reference_subset(w, h) for w, h in zip(want, have, strict=True))
        live = {i.get(key): i for i in have if isinstance(i, dict)}
        if any(w[key] not in live or not _reference_subset(w, live[w[key]]) for w in want):
            return False
        positions = [list(live).index(w[key]) for w in want]
        return positions == sorted(positions)
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have
    a, b = diff.quantity(want), diff.quantity(have)
    return want == have or (a is not None and a == b)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(
    ["a", "b", "1", "1000m", "1Gi", "1024Mi", "0.5", "500m", "TCP", ""]))
_keys = st.sampled_from(["name", "mountPath", "containerPort", "type", "value", "x"])
_trees = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)), max_leaves=20)


def _outcome(subset: Any, want: Any, have: Any) -> bool | type[Exception]:
    try:
        return bool(subset(want, have))
    except TypeError as e:  # a list as a list item's name: no Kubernetes object has one; both refuse it
        return type(e)


@settings(max_examples=1500, deadline=None)
@given(_trees, _trees)
def test_the_diff_says_what_its_rule_says(want: Any, have: Any) -> None:
    assert _outcome(diff.is_subset, want, have) == _outcome(_reference_subset, want, have)


@settings(max_examples=500, deadline=None)
@given(_trees)
def test_a_tree_is_a_subset_of_itself_as_its_rule_says(tree: Any) -> None:
    assert _outcome(diff.is_subset, tree, tree) == _outcome(_reference_subset, tree, tree)
