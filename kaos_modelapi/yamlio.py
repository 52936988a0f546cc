"""YAML output that people read: block scalars for multi-line strings, no anchors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

import yaml


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared sub-objects are written out in full: readers should not need anchors


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Block style (|) keeps scripts and configs readable; PyYAML refuses it for trailing spaces, so skip those.
    if "\n" in value and not any(line.endswith(" ") for line in value.splitlines()):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def dump_all(objs: Iterable[Any], stream: TextIO) -> None:
    yaml.dump_all(objs, stream, Dumper=_Dumper, sort_keys=False, width=120)
