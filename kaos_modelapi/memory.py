"""Give the C allocator's free memory back to the system, and keep the cycle collector off what stays.

Importing the libraries (kubernetes_asyncio's generated client above all) and every burst of work (a cold
converge parses thousands of watch events) allocate and free many blocks through glibc's malloc, which keeps
the freed pages in the middle of its heap: about 20 MiB after the imports alone. `malloc_trim(0)` returns
them (madvise), costing a few milliseconds. Without glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

TRIM_INTERVAL_SECONDS = 10.0
# Container objects allocated (net) between two young-generation collections; Python's default is 700. A
# watch event decodes into hundreds of dicts, nearly all freed by reference counting within the event: at
# 700 the collector ran every other event and walked objects about to be freed anyway.
YOUNG_COLLECTION_THRESHOLD = 5000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system; True when some were."""
    return bool(_TRIM(0)) if _TRIM is not None else False


async def release_periodically(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """Release free memory now and every `interval` seconds, so that what a burst of work freed does not stay
    in the process's resident size (nor raise its peak over the next burst). Runs until cancelled."""
    if _TRIM is None:
        return
    while True:
        release_free_memory()
        await asyncio.sleep(interval)


def set_imports_aside() -> None:
    """At the start, before the initial lists: what the imports made (most of the objects the collector
    tracks: modules, classes, functions) out of its reach, and the young generation collected less often, so
    that the collections the lists set off do not walk it again, nor does `settle_collector`'s full one (a
    start with 1000 ModelAPIs converged spent about 0.1 s of CPU in them before its first reconcile). Not
    collected first: a full collection here would cost what this saves; the few cycles the imports left
    unreachable (tens of objects) are kept for the process's life."""
    gc.freeze()
    _collect_young_less_often()


def settle_collector() -> None:
    """Once the imports are done and the caches filled: collect once, then move every object left (the
    libraries' modules and classes, the cached objects) out of the cycle collector's reach (`gc.freeze`), and
    collect the young generation less often. Every full collection walked them all again, for cycles they
    never form (the caches hold plain dicts and lists, freed by reference counting): about 6 % of the
    operator's CPU on a cold converge (perf). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
    _collect_young_less_often()


def _collect_young_less_often() -> None:
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_COLLECTION_THRESHOLD), middle, old)
