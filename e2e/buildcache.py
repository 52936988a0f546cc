"""Build an artefact once into ~/.cache/kaos-modelapi, however many sessions ask for it at the same time.

The control plane, the node's Go binaries and Ollama are cached by a hash of what goes into them; the build
itself is minutes long, so a second session that wants the same file waits for the first instead of
building it again, and a reader never sees half a file (it is written aside and renamed into place).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on path (created if missing) across processes; on_wait() runs if we must wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_once(target: Path, make: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """target, built by make(tmp) unless it exists; make writes the file at tmp, which is renamed to target."""
    if target.exists():
        return target
    with exclusive(target.parent / ".lock", lambda: log(f"waiting for another build of {target} ...")):
        if target.exists():  # the other build made it
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            make(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.rename(target)  # atomic: a concurrent reader sees no file or a whole one
    return target
