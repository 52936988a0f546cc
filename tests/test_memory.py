"""Giving freed memory back to the system (kaos_modelapi/memory.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from kaos_modelapi import memory


def rss_kib() -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1))


def test_freed_heap_goes_back_to_the_system() -> None:
    memory.release_free_memory()
    blocks = [bytearray(8000) for _ in range(10000)]  # ~80 MB in malloc's heap (not pymalloc: > 512 bytes)
    del blocks[:-10]  # freed, but the last blocks pin the heap's top: free() alone returns nothing
    before = rss_kib()
    assert memory.release_free_memory()
    assert rss_kib() < before - 40_000
    assert blocks


async def test_release_periodically_runs_until_cancelled() -> None:
    task = asyncio.create_task(memory.release_periodically(0.01))
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_settled_objects_are_left_alone_and_later_cycles_still_collected() -> None:
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.me = self

    threshold = gc.get_threshold()
    kept = [{"cached": i} for i in range(1000)]
    try:
        memory.settle_collector()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold()[0] >= memory.YOUNG_COLLECTION_THRESHOLD
        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None  # a cycle made after settling is collected as ever
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_what_the_imports_made_is_set_aside_and_later_cycles_still_collected() -> None:
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.me = self

    threshold = gc.get_threshold()
    before = gc.get_freeze_count()
    try:
        memory.set_imports_aside()
        assert gc.get_freeze_count() > before
        assert gc.get_threshold()[0] >= memory.YOUNG_COLLECTION_THRESHOLD
        later = Node()
        gone = weakref.ref(later)
        del later
        memory.settle_collector()  # the caches filled: collects what is not set aside
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
