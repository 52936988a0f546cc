"""Does a live object already say what we want? Pure.

The operator applies a child only when the cached object differs from the desired one, so a converged
cluster gets no writes at all (server-side apply of an unchanged object is still a write request). The
live object carries more than we set (server defaults, other managers' fields), so the question is whether
the desired object is a *subset* of the live one, with Kubernetes' list semantics: lists of named items
(containers, env, volumes, ports, mounts) are matched by key, other lists must match item for item.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

# Merge keys of the lists the operator writes, in order of preference.
_LIST_KEYS = ("name", "mountPath", "containerPort", "type")

_SUFFIXES: dict[str, Decimal | int] = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_MISSING = object()
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def quantity(value: Any) -> Decimal | None:
    """A resource quantity as a number, since the server rewrites e.g. "1000m" as "1"."""
    match = _QUANTITY.match(str(value))
    if match is None:
        return None
    try:
        return Decimal(match.group(1)) * Decimal(_SUFFIXES[match.group(2) or ""])
    except ArithmeticError:  # InvalidOperation, or Overflow: a hex hash such as "09e1560928115242" parses
        return None


def _scalar_equal(want: Any, have: Any) -> bool:
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have  # True == 1 in Python, not in Kubernetes
    if want == have:
        return True
    a, b = quantity(want), quantity(have)
    return a is not None and a == b


def _list_key(items: list[Any]) -> str | None:
    if not items:
        return None
    for item in items:
        if not isinstance(item, dict):
            return None
    for key in _LIST_KEYS:
        for item in items:
            if key not in item:
                break
        else:
            return key
    return None


def _list_subset(want: list[Any], have: list[Any]) -> bool:
    key = _list_key(want)
    if key is None:
        if len(want) != len(have):
            return False
        for w, h in zip(want, have, strict=True):  # noqa: SIM110 (a loop, as in _dict_subset)
            if not is_subset(w, h):
                return False
        return True
    live = {i.get(key): i for i in have if isinstance(i, dict)}
    for w in want:
        held = live.get(w[key], _MISSING)
        if held is _MISSING or not is_subset(w, held):
            return False
    # Order matters for env ($(VAR) references) and containers (the first is the default for kubectl).
    order = {k: i for i, k in enumerate(live)}
    positions = [order[w[key]] for w in want]
    return positions == sorted(positions)


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of `want` is in `have` with the same value."""
    if isinstance(want, dict):
        return isinstance(have, dict) and _dict_subset(want, have)
    if isinstance(want, list):
        return isinstance(have, list) and _list_subset(want, have)
    return _scalar_equal(want, have)


def _dict_subset(want: dict[str, Any], have: dict[str, Any]) -> bool:
    # A loop, not all() over a generator: the diff runs on every reconcile, a no-op one is mostly this.
    for key, value in want.items():
        if value is None:
            continue
        held = have.get(key, _MISSING)
        if held is _MISSING:
            return False
        if type(value) is str and type(held) is str:
            if value != held and not _scalar_equal(value, held):
                return False
        elif not is_subset(value, held):
            return False
    return True


def needs_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Whether `desired` must be applied over `live` (the cached object, None when absent)."""
    if live is None:
        return True
    want = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
    return not is_subset(want, live)


def metadata_only(obj: dict[str, Any]) -> dict[str, Any]:
    """The apply body for an object whose content the operator must never rewrite (a generated Secret)."""
    meta = obj["metadata"]
    keep = {k: meta[k] for k in ("name", "namespace", "labels", "annotations", "ownerReferences") if k in meta}
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": keep}


def overlay(live: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """`live` with every field of `desired` written over it, lists replaced whole.

    For the one case server-side apply cannot mend: a hand edit that added list items under another field
    manager (a second port named "http") which make our apply invalid. Replacing the lists removes them."""
    out = dict(live)
    for key, value in desired.items():
        if isinstance(value, dict) and isinstance(live.get(key), dict):
            out[key] = overlay(live[key], value)
        else:
            out[key] = value
    return out


def strategy_handover(desired: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any] | None:
    """What to apply first when a Deployment moves to the Recreate strategy while the live one carries
    `rollingUpdate` parameters that no field manager applied (the API server's defaults, e.g. under an
    older operator): server-side apply leaves fields it does not own, and Recreate beside them is invalid.
    Applying the live parameters first as ours makes them ours, so the apply of Recreate then removes them
    (no roll: the pod template is the desired one both times). None when the apply needs no such step."""
    if desired.get("kind") != "Deployment" or live is None:
        return None
    wanted = desired["spec"].get("strategy") or {}
    current = (live.get("spec") or {}).get("strategy") or {}
    if wanted.get("type") != "Recreate" or "rollingUpdate" not in current:
        return None
    spec = {**desired["spec"], "strategy": {"type": current.get("type", "RollingUpdate"),
                                            "rollingUpdate": current["rollingUpdate"]}}
    return {**desired, "spec": spec}
