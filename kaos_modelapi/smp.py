"""Strategic merge patch for PodSpec, as the Kubernetes API server applies it.

Mirrors k8s.io/apimachinery/pkg/util/strategicpatch (StrategicMergeMapPatch with MergeParallelList and
IgnoreUnmatchedNulls, the options the apiserver's PATCH handler uses), driven by the x-kubernetes-patch-*
metadata of the vendored upstream schema. Deliberate differences, each where upstream would silently lose
part of the override or fail on a documented directive:

- a value the original lacks is the patch applied to nothing, so `$patch: replace` inside a new field or
  a new list item keeps its content (upstream drops the whole map);
- `$patch: merge` is accepted as an explicit statement of the default (upstream rejects it);
- an empty merge key counts as missing (the CRD defaults absent list-map keys to "", see podspec_schema);
- a patch value of the wrong JSON type is an error here, not a later decode failure;
- `$deleteFromPrimitiveList/x` runs after `x` is merged (upstream's order is Go's random map order;
  after is the order it uses when `$setElementOrder/x` is present, as in the patches kubectl computes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final

from .podspec_schema import (
    DELETE_FROM_PRIMITIVE_LIST_PREFIX,
    PATCH_DIRECTIVE,
    RETAIN_KEYS_DIRECTIVE,
    SET_ELEMENT_ORDER_PREFIX,
    SchemaNode,
    pod_spec_schema,
)

__all__ = ["StrategicMergeError", "merge_pod_spec", "strategic_merge"]


class StrategicMergeError(ValueError):
    """An override that cannot be applied; `path` names the offending part of the override."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# A field the original does not have; and a merge result meaning "leave the field out".
_ABSENT: Final = _Sentinel("ABSENT")
_OMIT: Final = _Sentinel("OMIT")

Key = tuple[str, Hashable]


def merge_pod_spec(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The operator's entry point: `override` (ModelAPI spec.podSpec) merged onto the generated pod spec."""
    return strategic_merge(base, override, pod_spec_schema(), path="spec.podSpec")


def strategic_merge(
    original: dict[str, Any], patch: dict[str, Any], schema: SchemaNode, path: str = "$"
) -> dict[str, Any]:
    """`patch` applied to `original` with strategic-merge semantics; neither input is modified."""
    _expect(original, dict, path, "original")
    _expect(patch, dict, path, "patch")
    merged = _merge_map(original, patch, schema, path)
    return {} if merged is _OMIT else copy.deepcopy(merged)


# ---------------------------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------------------------


def _merge_map(original: Any, patch: Mapping[str, Any], node: SchemaNode | None, path: str) -> Any:
    """Merge two JSON objects; `original` is _ABSENT when the field does not exist yet."""
    if PATCH_DIRECTIVE in patch:
        directive = patch[PATCH_DIRECTIVE]
        rest = {k: v for k, v in patch.items() if k != PATCH_DIRECTIVE}
        if directive == "replace":
            return _merge_map(_ABSENT, rest, node, path)
        if directive == "delete":
            # Upstream leaves an empty object where the field was, and nothing where it was not.
            return _OMIT if original is _ABSENT else {}
        if directive != "merge":
            raise StrategicMergeError(path, f"unknown {PATCH_DIRECTIVE} directive {directive!r}")
        patch = rest
    base = {} if original is _ABSENT else dict(original)
    base = _apply_retain_keys(base, patch, path)
    fields = {k: v for k, v in patch.items() if k != RETAIN_KEYS_DIRECTIVE}
    base, fields = _apply_set_element_orders(base, fields, node, path)
    for key, value in fields.items():
        if key.startswith("$"):
            if not key.startswith(DELETE_FROM_PRIMITIVE_LIST_PREFIX):
                raise StrategicMergeError(_join(path, key), "unknown directive")
            continue
        base = _set_field(base, key, value, _child(node, key), _join(path, key))
    return _apply_primitive_deletions(base, fields, node, path)


def _set_field(base: dict[str, Any], key: str, value: Any, node: SchemaNode | None, path: str) -> dict[str, Any]:
    if value is None:
        return {k: v for k, v in base.items() if k != key}
    merged = _merge_value(base.get(key, _ABSENT), value, node, path)
    if merged is _OMIT:
        return {k: v for k, v in base.items() if k != key}
    return {**base, key: merged}


def _apply_retain_keys(base: dict[str, Any], patch: Mapping[str, Any], path: str) -> dict[str, Any]:
    """`$retainKeys`: drop original fields not listed, after checking the patch sets only listed ones."""
    if RETAIN_KEYS_DIRECTIVE not in patch:
        return base
    retained = patch[RETAIN_KEYS_DIRECTIVE]
    where = _join(path, RETAIN_KEYS_DIRECTIVE)
    if not isinstance(retained, list) or not all(isinstance(k, str) for k in retained):
        raise StrategicMergeError(where, "must be a list of field names")
    for key, value in patch.items():
        if value is None or key.startswith("$"):
            continue
        if key not in retained:
            raise StrategicMergeError(where, f"patch sets {key!r}, which is not in the list")
    return {k: v for k, v in base.items() if k in retained}


def _apply_primitive_deletions(
    base: dict[str, Any], fields: Mapping[str, Any], node: SchemaNode | None, path: str
) -> dict[str, Any]:
    """`$deleteFromPrimitiveList/<field>: [values]` removes those values from a list of scalars."""
    for key, doomed in fields.items():
        if not key.startswith(DELETE_FROM_PRIMITIVE_LIST_PREFIX):
            continue
        where = _join(path, key)
        target = _directive_target(key, DELETE_FROM_PRIMITIVE_LIST_PREFIX, where)
        target_node = _child(node, target)
        if node is not None and node.kind == "struct" and (target_node is None or target_node.kind != "array"):
            raise StrategicMergeError(where, f"{target!r} is not a list field")
        if not isinstance(doomed, list):
            raise StrategicMergeError(where, f"must be a list, got {_json_type(doomed)}")
        current = base.get(target, _ABSENT)
        if current is _ABSENT:
            continue
        if not isinstance(current, list) or any(isinstance(v, dict | list) for v in current + doomed):
            raise StrategicMergeError(where, f"{target!r} is not a list of primitives")
        gone = {_scalar_key(v) for v in doomed}
        base = {**base, target: [v for v in current if _scalar_key(v) not in gone]}
    return base


# ---------------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------------


def _merge_value(original: Any, patch: Any, node: SchemaNode | None, path: str) -> Any:
    """Merge one non-null patch value onto the original value (or _ABSENT)."""
    _check_type(patch, node, path)
    if original is _ABSENT or _shape(original) != _shape(patch):
        return _materialize(patch, node, path)
    strategies = node.patch_strategies if node is not None else frozenset()
    if isinstance(patch, dict):
        if "replace" in strategies:
            return _materialize(patch, node, path)
        return _merge_map(original, patch, node, path)
    if isinstance(patch, list):
        if "merge" in strategies:
            return _merge_list(original, patch, node, path)
        return _materialize(patch, node, path)
    return patch


def _materialize(patch: Any, node: SchemaNode | None, path: str) -> Any:
    """A patch value applied to nothing: directives resolved, nulls dropped."""
    if isinstance(patch, dict):
        return _merge_map(_ABSENT, patch, node, path)
    if isinstance(patch, list):
        if node is not None and "merge" in node.patch_strategies and node.merge_key:
            return _materialize_object_list(patch, node.merge_key, _items(node), path)
        items = _items(node)
        values = [_merge_value(_ABSENT, v, items, f"{path}[{i}]") for i, v in enumerate(patch)]
        return [v for v in values if v is not _OMIT]
    return patch


def _materialize_object_list(patch: list[Any], merge_key: str, items: SchemaNode | None, path: str) -> list[Any]:
    """A merge list the original lacks: directive elements have nothing to act on and are dropped; the
    other items are kept as written, duplicates included, exactly as upstream stores a new list."""
    out: list[Any] = []
    for i, value in enumerate(patch):
        where = f"{path}[{i}]"
        _check_type(value, items, where)
        directive = value.get(PATCH_DIRECTIVE, _ABSENT)
        if directive not in (_ABSENT, "delete", "replace", "merge"):
            raise StrategicMergeError(where, f"unknown {PATCH_DIRECTIVE} directive {directive!r}")
        if directive in ("delete", "replace") or (directive == "merge" and not _has_content(value, merge_key)):
            continue
        _merge_key_value(value, merge_key, where)
        out.append(_merge_map(_ABSENT, value, items, where))
    return out


# ---------------------------------------------------------------------------------------------------------
# merge lists
# ---------------------------------------------------------------------------------------------------------


def _merge_list(original: list[Any], patch: list[Any], node: SchemaNode | None, path: str) -> list[Any]:
    """A list with patch strategy `merge`: by merge key for objects, as a set union for scalars."""
    if not original and not patch:
        return []
    items = _items(node)
    for i, value in enumerate(patch):
        _check_type(value, items, f"{path}[{i}]")
    if _element_shape(original + patch, path) != "object":
        merged = _dedupe(original + patch)
        return _ordered(merged, patch, original, _scalar_key, _scalar_key)
    merge_key = node.merge_key if node is not None else None
    if merge_key is None:
        raise StrategicMergeError(path, "cannot merge a list of objects without a merge key")
    return _merge_object_list(original, patch, merge_key, items, path)


def _merge_object_list(
    original: list[Any], patch: list[Any], merge_key: str, items: SchemaNode | None, path: str
) -> list[Any]:
    kept, plain, replace = _special_elements(original, patch, merge_key, path)
    if replace:
        return _replacement_list(plain, merge_key, items, path)
    merged = list(kept)
    for i, value in plain:
        merged = _merge_item(merged, value, merge_key, items, f"{path}[{i}]")
    _require_keys(kept, merge_key, path, "original item")
    item_key = _item_key(merge_key)
    return _ordered(merged, [v for _, v in plain], kept, item_key, item_key)


def _replacement_list(
    plain: list[tuple[int, dict[str, Any]]], merge_key: str, items: SchemaNode | None, path: str
) -> list[Any]:
    """The items of a list replaced with `$patch: replace`. Upstream then orders them by the first
    position of their key, which only matters (and regroups them) when the patch repeats a key."""
    keys = [_merge_key_value(value, merge_key, f"{path}[{i}]") for i, value in plain]
    merged = [
        (keys.index(key), _merge_map(_ABSENT, value, items, f"{path}[{i}]"))
        for key, (i, value) in zip(keys, plain, strict=True)
    ]
    return [item for _, item in sorted(merged, key=lambda pair: pair[0])]


def _special_elements(
    original: list[Any], patch: list[Any], merge_key: str, path: str
) -> tuple[list[Any], list[tuple[int, dict[str, Any]]], bool]:
    """Split off `$patch` elements: deletions applied to the original, a replace marker, merge markers.

    Returns the original after deletions, the remaining (index, element) pairs and whether the list is
    replaced by them.
    """
    kept = list(original)
    plain: list[tuple[int, dict[str, Any]]] = []
    replace = False
    for i, value in enumerate(patch):
        where = f"{path}[{i}]"
        directive = value.get(PATCH_DIRECTIVE, _ABSENT)
        if directive is _ABSENT:
            plain.append((i, value))
        elif directive == "delete":
            doomed = _merge_key_value(value, merge_key, where)
            kept = [v for v in kept if not _same_key(v, merge_key, doomed)]
        elif directive == "replace":
            replace = True
        elif directive == "merge":
            if _has_content(value, merge_key):
                plain.append((i, {k: v for k, v in value.items() if k != PATCH_DIRECTIVE}))
        else:
            raise StrategicMergeError(where, f"unknown {PATCH_DIRECTIVE} directive {directive!r}")
    return kept, plain, replace


def _has_content(marker: Mapping[str, Any], merge_key: str) -> bool:
    """Whether a `$patch: merge` element carries an item rather than only restating the default."""
    others = set(marker) - {PATCH_DIRECTIVE, merge_key}
    return bool(others) or marker.get(merge_key) not in (None, "")


def _merge_item(
    merged: list[Any], value: dict[str, Any], merge_key: str, items: SchemaNode | None, path: str
) -> list[Any]:
    """Merge one patch element into the list item with the same key, or append it."""
    key = _merge_key_value(value, merge_key, path)
    for index, existing in enumerate(merged):
        if _same_key(existing, merge_key, key):
            item = _merge_map(existing, value, items, path)
            return [*merged[:index], item, *merged[index + 1 :]]
    return [*merged, _merge_map(_ABSENT, value, items, path)]


def _merge_key_value(value: Mapping[str, Any], merge_key: str, path: str) -> Key:
    key = value.get(merge_key)
    if key is None or key == "":
        raise StrategicMergeError(path, f"merge key {merge_key!r} missing")
    if isinstance(key, dict | list):
        raise StrategicMergeError(path, f"merge key {merge_key!r} must be a scalar")
    return _scalar_key(key)


def _same_key(item: Any, merge_key: str, key: Key) -> bool:
    return isinstance(item, dict) and merge_key in item and _scalar_key(item[merge_key]) == key


def _require_keys(values: Sequence[Any], merge_key: str, path: str, what: str) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, dict) or merge_key not in value:
            raise StrategicMergeError(path, f"{what} {i} has no merge key {merge_key!r}")


# ---------------------------------------------------------------------------------------------------------
# ordering
# ---------------------------------------------------------------------------------------------------------


def _ordered(
    merged: list[Any],
    patch_order: Sequence[Any],
    server_order: Sequence[Any],
    key_of: Callable[[Any], Key],
    order_key_of: Callable[[Any], Key],
) -> list[Any]:
    """Upstream's order for a merged list: patch items in patch order, the others in original order,
    interleaved so that items the original already had keep their relative positions."""
    patch_keys = [order_key_of(v) for v in patch_order]
    server_keys = [key_of(v) for v in server_order]
    from_patch = sorted((v for v in merged if key_of(v) in patch_keys), key=lambda v: patch_keys.index(key_of(v)))
    server_only = [v for v in merged if key_of(v) not in patch_keys]
    server_only.sort(key=lambda v: _index(server_keys, key_of(v)))
    return _interleave(server_only, from_patch, server_keys, key_of)


def _interleave(
    server_only: list[Any], from_patch: list[Any], server_keys: list[Key], key_of: Callable[[Any], Key]
) -> list[Any]:
    """Take a server-only item first only when both items are in the original and it came first there."""
    out: list[Any] = []
    i = j = 0
    while i < len(server_only) or j < len(from_patch):
        if j >= len(from_patch):
            out.append(server_only[i])
            i += 1
            continue
        if i < len(server_only):
            left = _index(server_keys, key_of(server_only[i]))
            right = _index(server_keys, key_of(from_patch[j]))
            if 0 <= left < right:
                out.append(server_only[i])
                i += 1
                continue
        out.append(from_patch[j])
        j += 1
    return out


def _index(keys: Sequence[Key], key: Key) -> int:
    return keys.index(key) if key in keys else -1


def _apply_set_element_orders(
    base: dict[str, Any], fields: dict[str, Any], node: SchemaNode | None, path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`$setElementOrder/<field>`: merge that field now and put its items in the given order.

    Returns the new base and the fields still to merge (the ordered fields are done).
    """
    for directive in [k for k in fields if k.startswith(SET_ELEMENT_ORDER_PREFIX)]:
        where = _join(path, directive)
        target = _directive_target(directive, SET_ELEMENT_ORDER_PREFIX, where)
        order = fields[directive]
        field_node = _child(node, target)
        if not isinstance(order, list):
            raise StrategicMergeError(where, f"must be a list, got {_json_type(order)}")
        if field_node is None or field_node.kind != "array" or "merge" not in field_node.patch_strategies:
            raise StrategicMergeError(where, f"{target!r} is not a list that merges")
        base = _ordered_field(base, fields, target, order, field_node, path, where)
        fields = {k: v for k, v in fields.items() if k not in (directive, target)}
    return base, fields


def _ordered_field(
    base: dict[str, Any],
    fields: Mapping[str, Any],
    target: str,
    order: list[Any],
    field_node: SchemaNode,
    path: str,
    where: str,
) -> dict[str, Any]:
    original = base.get(target, _ABSENT)
    patch = fields.get(target, _ABSENT)
    for value in (original, patch):
        if value is not _ABSENT and not isinstance(value, list):
            raise StrategicMergeError(_join(path, target), f"must be a list, got {_json_type(value)}")
    merge_key = field_node.merge_key
    key_of = _item_key(merge_key) if merge_key else _scalar_key
    _check_order(patch if isinstance(patch, list) else [], order, merge_key, key_of, where)
    if patch is _ABSENT and original is _ABSENT:
        return base
    merged = original if patch is _ABSENT else _merge_value(original, patch, field_node, _join(path, target))
    server = original if isinstance(original, list) else []
    if merge_key:
        _require_keys(merged, merge_key, _join(path, target), "item")
    return {**base, target: _ordered(merged, order, server, key_of, key_of)}


def _check_order(
    patch: list[Any], order: list[Any], merge_key: str | None, key_of: Callable[[Any], Key], where: str
) -> None:
    """Patch items (other than directives) must appear in the order list, in the same relative order."""
    if merge_key:
        for i, value in enumerate(order):
            if not isinstance(value, dict):
                raise StrategicMergeError(f"{where}[{i}]", "must be an object naming the merge key")
            _merge_key_value(value, merge_key, f"{where}[{i}]")
    if not order:
        return  # upstream skips the check for an empty order list
    wanted = [key_of(v) for v in patch if not (isinstance(v, dict) and PATCH_DIRECTIVE in v)]
    listed = [key_of(v) for v in order]
    position = 0
    for key in wanted:
        if key not in listed[position:]:
            raise StrategicMergeError(where, "does not list every patched item in the patch's order")
        position = listed.index(key, position) + 1


# ---------------------------------------------------------------------------------------------------------
# schema and JSON helpers
# ---------------------------------------------------------------------------------------------------------


def _child(node: SchemaNode | None, key: str) -> SchemaNode | None:
    """Schema of a field; None for fields the vendored schema does not know (merged without metadata)."""
    if node is None:
        return None
    if node.kind == "struct":
        return node.prop(key)
    if node.kind == "map":
        return node.values()
    return None


def _items(node: SchemaNode | None) -> SchemaNode | None:
    return node.items() if node is not None and node.kind == "array" else None


def _check_type(value: Any, node: SchemaNode | None, path: str) -> None:
    if node is None:
        return
    if node.kind == "scalar-union":
        accepted = node.scalar_types
    else:
        accepted = frozenset({"object" if node.kind in ("struct", "map", "free-form") else node.kind})
    if not _json_types(value) & accepted:
        expected = " or ".join(sorted(accepted))
        raise StrategicMergeError(path, f"expected {expected}, got {_json_type(value)}")


def _json_types(value: Any) -> frozenset[str]:
    """Schema types a JSON value satisfies; JSON has one number type, so 2.0 is an integer too."""
    if isinstance(value, bool):
        return frozenset({"boolean"})
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return frozenset({"integer", "number"})
    if isinstance(value, float):
        return frozenset({"number"})
    return frozenset({_json_type(value)})


def _expect(value: Any, kind: type, path: str, what: str) -> None:
    if not isinstance(value, kind):
        raise StrategicMergeError(path, f"{what} must be a JSON object, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _shape(value: Any) -> str:
    """Upstream merges only when both sides are objects or both are lists; anything else is replaced."""
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else "scalar"


def _element_shape(values: list[Any], path: str) -> str:
    shapes = {_shape(v) for v in values}
    if "array" in shapes:
        raise StrategicMergeError(path, "lists of lists cannot be merged")
    if len(shapes) > 1:
        raise StrategicMergeError(path, "list mixes objects and scalars")
    return shapes.pop()


def _scalar_key(value: Any) -> Key:
    """Equality as in Go's interface comparison: 1 and 1.0 match (JSON numbers), True and 1 do not."""
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", value)
    if value is None:
        return ("null", None)
    return ("string", value) if isinstance(value, str) else ("other", repr(value))


def _item_key(merge_key: str) -> Callable[[Any], Key]:
    def key_of(item: Any) -> Key:
        return _scalar_key(item.get(merge_key)) if isinstance(item, dict) else ("other", repr(item))

    return key_of


def _dedupe(values: list[Any]) -> list[Any]:
    seen: set[Key] = set()
    out: list[Any] = []
    for value in values:
        key = _scalar_key(value)
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def _directive_target(directive: str, prefix: str, path: str) -> str:
    target = directive[len(prefix) :]
    if not target:
        raise StrategicMergeError(path, "names no field")
    return target


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
