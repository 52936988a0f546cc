"""Run the operator (`python -m kaos_modelapi ARGS`) with tracemalloc on, for e2e/bench/memory.py.

Kept out of the operator: this wraps its entry point. tracemalloc starts before anything is imported, so a
snapshot shows the imports too. Each SIGUSR2 writes, into the folder MEMTRACE_OUT:

- `N.snap`, a tracemalloc snapshot (load it with `tracemalloc.Snapshot.load`);
- `N.json`, the traced memory now and its peak since the last signal, and what each informer's cache holds:
  entries and bytes per kind (keys, packed objects and stamps, each counted once), and a sample object.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any

FRAMES = int(os.environ.get("MEMTRACE_FRAMES", "1"))


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of obj and of everything it holds (dicts, lists, tuples, sets), each object once."""
    size, todo = 0, [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        size += sys.getsizeof(o)
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            todo.extend(o)
    return size


def tracked_objects() -> list[Any]:
    """Every object the cycle collector tracks, frozen ones too: the operator freezes what its start-up made,
    the informers among it (kaos_modelapi.memory), and gc.get_objects() leaves frozen objects out. Frozen
    again after, with what else exists now, as the operator's own `settle_collector` does."""
    gc.unfreeze()
    try:
        return gc.get_objects()
    finally:
        gc.freeze()


def caches() -> dict[str, dict[str, Any]]:
    from kaos_modelapi.informer import Informer

    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for informer in (o for o in tracked_objects() if isinstance(o, Informer)):
        name = informer._resource.plural  # (a debugging tool may read private fields)
        entries = informer.store._entries
        entry = out.setdefault(name, {"objects": 0, "kib": 0.0})
        if entries and "sample" not in entry:
            entry["sample"] = informer.store.get(next(reversed(entries)))
        entry["objects"] += len(entries)
        entry["kib"] += round(sum(deep_size(k, seen) + deep_size(v, seen) for k, v in entries.items()) / 1024, 1)
    for entry in out.values():
        entry["bytes_per_object"] = round(entry["kib"] * 1024 / entry["objects"]) if entry["objects"] else 0
    return out


def dump(folder: Path, count: list[int]) -> None:
    count[0] += 1
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    tracemalloc.take_snapshot().dump(str(folder / f"{count[0]}.snap"))
    summary = {"traced_mib": round(current / 2**20, 1), "traced_peak_mib": round(peak / 2**20, 1),
               "caches": caches()}
    (folder / f"{count[0]}.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    tracemalloc.start(FRAMES)
    folder = Path(os.environ["MEMTRACE_OUT"])
    folder.mkdir(parents=True, exist_ok=True)
    count = [0]

    def on_signal(_: int, __: FrameType | None) -> None:
        dump(folder, count)

    signal.signal(signal.SIGUSR2, on_signal)
    sys.argv = ["kaos_modelapi", *sys.argv[1:]]
    runpy.run_module("kaos_modelapi", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
