"""The operator's memory on a cold converge of N ModelAPIs, alone (issue 14's memory targets), in a few minutes.

    .venv/bin/python e2e/bench/memory.py 1000          # RSS idle, peak (VmHWM) and after the converge
    .venv/bin/python e2e/bench/memory.py 100 3         # and after each of 2 more batches of 100
    MEMTRACE=1 .venv/bin/python e2e/bench/memory.py 1000   # and what the process holds (tracemalloc)

On a fresh private control plane (stand-in node), as `make bench` runs the operator: start-up with a canary
(idle RSS), then `kubectl apply` of N ModelAPIs of the bench's mix until all are Ready; with a number of
batches, again N into a namespace of their own, each once the one before has converged. What each further
batch adds per ModelAPI is the cost of one more (`batches_kib_per_modelapi`); the first batch also pays once
for what the first burst of work brings in (more connections to the API server, the PodSpec schema), which
"above idle" divides by N. With MEMTRACE=1 the operator runs under e2e/bench/memtrace.py and a tracemalloc
snapshot is taken idle and converged: the report adds the bytes each cache holds per object, the top
allocation sites, and what grew between the two. Under tracemalloc the process is larger and slower: its RSS
figures are not the operator's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e.bench import bench, scenarios
from e2e.bench.process import OperatorProcess

TOP = int(os.environ.get("MEMTRACE_TOP", "30"))


async def snapshot(op: OperatorProcess, folder: Path, count: int) -> dict[str, Any]:
    os.kill(op.pid, signal.SIGUSR2)
    done = folder / f"{count}.json"
    deadline = time.monotonic() + 300
    while not done.exists() or not done.stat().st_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {done}")
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)  # (the file is written in one call; let it be closed)
    summary: dict[str, Any] = json.loads(done.read_text())
    return summary


def top_lines(folder: Path) -> str:
    idle = tracemalloc.Snapshot.load(str(folder / "1.snap"))
    converged = tracemalloc.Snapshot.load(str(folder / "2.snap"))
    out = ["converged, by file:"]
    out += [f"  {s}" for s in converged.statistics("filename")[:TOP]]
    out += ["converged, by line:"]
    out += [f"  {s}" for s in converged.statistics("lineno")[:TOP]]
    out += ["grown since idle, by line:"]
    out += [f"  {s}" for s in converged.compare_to(idle, "lineno")[:TOP]]
    return "\n".join(out)


async def run(n: int, trace: bool, batches: int = 1) -> dict[str, Any]:
    options = scenarios.Options()
    folder = Path(tempfile.mkdtemp(prefix="kaos-memtrace-")) if trace else Path()
    if trace:
        script = Path(__file__).with_name("memtrace.py")
        options.operator = options.operator.replace("{python} -m kaos_modelapi", f"{{python}} {script}")
        os.environ["MEMTRACE_OUT"] = str(folder)
    result: dict[str, Any] = {"n": n, "tracemalloc": trace}
    async with bench.fresh_cluster() as kubeconfig, scenarios.Cluster.running(kubeconfig, options, ["operator"]) as c:
        r = await scenarios.Run.create(c, options)
        try:
            idle = await r.start()
            result["idle_rss_mib"] = idle["rss_mib"]
            if trace:
                result["idle"] = await snapshot(r.op, folder, 1)
            cold = (await scenarios.converge_in(c, options.ns("op"), n, [0], r.op))[0]
            for key in ("ready_s", "cpu_s", "peak_rss_mib", "rss_mib"):
                result[key] = cold.get(key, cold.get("error"))
            if "rss_mib" in cold:
                result["peak_kib_per_modelapi"] = round((cold["peak_rss_mib"] - idle["rss_mib"]) * 1024 / n, 1)
                result["rss_kib_per_modelapi"] = round((cold["rss_mib"] - idle["rss_mib"]) * 1024 / n, 1)
                result["batches_rss_mib"] = rss = [idle["rss_mib"], cold["rss_mib"]]
                for batch in range(2, batches + 1):
                    # (names of their own: the same names again would share the first batch's strings)
                    more = (await scenarios.converge_in(c, options.ns(f"op{batch}"), n, [0], r.op,
                                                        prefix=f"b{batch}"))[0]
                    rss.append(more["rss_mib"])
                result["batches_kib_per_modelapi"] = [round((b - a) * 1024 / n, 1) for a, b in pairwise(rss)]
            if trace:
                result["converged"] = await snapshot(r.op, folder, 2)
                print(top_lines(folder), flush=True)
        finally:
            r.op.stop()
            await r.canary.stop()
    result["snapshots"] = str(folder) if trace else None
    return result


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    batches = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    result = asyncio.run(run(n, os.environ.get("MEMTRACE", "") in ("1", "true"), batches))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
