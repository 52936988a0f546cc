"""Benchmark of the operator against the limit (issue 14): `make bench`, `make bench N=100,1000,3000`.

For each N: a fresh local control plane (stand-in node: pods turn Ready without running) where a minimal
client (e2e/bench/limit.py) converges N ModelAPIs, after timing a plain `kubectl apply` of them; then another
fresh one where the operator runs the scenarios (e2e/bench/scenarios.py). Prints a table, the targets met or
not, and a JSON summary as the last line; draws a chart (BENCH_CHART, default .bench/bench.png).

Environment:
    BENCH_N          comma-separated sizes (default 100,1000; `make bench N=...` sets it)
    BENCH_OPERATOR   the operator's command line (default: `kaos-modelapi run ...`); placeholders {python},
                     {kubeconfig} (its own credentials: use them), {resync} (seconds between resyncs)
    BENCH_CRD        a CRD file for that operator (default: `kaos-modelapi crd`)
    BENCH_PYTHON     the interpreter of the operator and the limit client ({python}; default: this one's).
                     `make bench` gives the image's (Debian's python3.11, in .venv-runtime) when it is here
    BENCH_WORKERS    the limit client's concurrency (default 3: the operator's --kube-api-in-flight)
    BENCH_NOISE      ConfigMaps,Deployments,Secrets of the noise scenario (default 5000,1000,2000)
    BENCH_APPLY_ROUNDS  rounds of the user's apply on the operator's cluster, with it and without (default 8 at
                     N=100, 5 from N=160: scenarios.apply_rounds; 0: none)
    BENCH_QUICK=1    cold, update, restart and resync only (the smoke test)
    BENCH_ONLY=limit the limit client's phase only (no operator)
    BENCH_MIX        default, or peer / peer-kaos: the ModelAPIs both this CRD and KAOS's accept, spelled for
                     this CRD or KAOS's (e2e/bench/manifests.py), to measure a peer operator
    BENCH_LIMIT=0    no limit client (the plain `kubectl apply` still runs); implied by BENCH_MIX=peer-kaos,
                     whose spelling the limit client (this operator's children) does not read
    BENCH_OUT        folder of the JSON and the chart (default .bench/)
    KUBECONFIG       use this cluster for both phases instead of private ones (namespaces are deleted between)

`python e2e/bench/bench.py report A.json B.json` prints and charts the results of several runs as one.
Stopped by Ctrl-C or SIGTERM, it stops what it started (control planes, the operator, the limit client) and
removes their folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e import cluster
from e2e.bench import manifests, report, scenarios


@contextlib.asynccontextmanager
async def fresh_cluster() -> AsyncIterator[str]:
    external = os.environ.get("KUBECONFIG", "")
    if external and Path(external).is_file():
        yield external
        return
    async with private_cluster() as kubeconfig:
        yield kubeconfig


@contextlib.asynccontextmanager
async def private_cluster() -> AsyncIterator[str]:
    """A local control plane of its own (stand-in node), on free ports, stopped and removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="kaos-bench-cluster-"))
    starting = asyncio.ensure_future(asyncio.to_thread(cluster.start, state, cluster.free_ports(),
                                                       exit_with_parent=True))
    try:
        # (shielded: cancelled while it starts, the start still ends, and what it started is stopped below)
        started = await asyncio.shield(starting)
        yield str(started.kubeconfig)
    finally:
        with contextlib.suppress(Exception):  # (a start that failed left nothing running)
            await starting
        await asyncio.to_thread(cluster.stop, state)


def with_limit() -> bool:
    return os.environ.get("BENCH_LIMIT", "1") != "0" and manifests.mix() != "peer-kaos"


async def measure(n: int, options: scenarios.Options, log: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"n": n}
    async with fresh_cluster() as kubeconfig, scenarios.Cluster.running(kubeconfig, options, ["limit"]) as c:
        log(f"N={n}: kubectl apply without an operator")
        result["apply_without_operator_s"] = await scenarios.plain_apply(c, n, options.ns("plain"))
        if with_limit():
            log(f"N={n}: the limit client")
            result["limit"] = await scenarios.limit_scenarios(c, n, options)
            log(f"N={n}: the limit client: {json.dumps(result['limit'])[:2000]}")
        if os.environ.get("KUBECONFIG"):
            for ns in (options.ns("plain"), options.ns("limit")):
                await c.admin.request("DELETE", f"/api/v1/namespaces/{ns}")
                await c.gone(ns, 300 + n)
    if os.environ.get("BENCH_ONLY") == "limit":
        return result
    async with fresh_cluster() as kubeconfig, scenarios.Cluster.running(kubeconfig, options, ["operator"]) as c:
        log(f"N={n}: the operator")
        result["operator"] = await scenarios.operator_scenarios(c, n, options)
    return result


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 2**20, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()}


def interpreter(python: str) -> str:
    """Which Python runs the operator (its path and version): the same code needs 7 % less CPU on the image's."""
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return f"{python}: {version}"


def options_from_env() -> scenarios.Options:
    options = scenarios.Options()
    options.operator = os.environ.get("BENCH_OPERATOR") or options.operator
    options.python = os.environ.get("BENCH_PYTHON") or options.python
    options.crd = os.environ.get("BENCH_CRD", "")
    options.workers = int(os.environ.get("BENCH_WORKERS", options.workers))
    if noise := os.environ.get("BENCH_NOISE"):
        a, b, c = (int(x) for x in noise.split(","))
        options.noise = (a, b, c)
    options.full = os.environ.get("BENCH_QUICK", "") not in ("1", "true")
    if rounds := os.environ.get("BENCH_APPLY_ROUNDS"):
        options.apply_rounds = int(rounds)
    return options


async def main_async() -> dict[str, Any]:
    sizes = [int(x) for x in os.environ.get("BENCH_N", "100,1000").replace(" ", "").split(",") if x]
    options = options_from_env()
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.0f} s] {message}", file=sys.stderr, flush=True)

    out = Path(os.environ.get("BENCH_OUT") or Path(__file__).resolve().parents[2] / ".bench")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        results.append(await measure(n, options, log))
        (out / "partial.json").write_text(json.dumps(results, indent=1))  # what is done, should a later N fail
    chart = Path(os.environ.get("BENCH_CHART") or out / "bench.png")
    report.chart(results, chart)
    summary = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(), "operator": options.operator, "operator_python": interpreter(options.python),
        "chart": str(chart),
        "duration_s": round(time.monotonic() - began), "results": results, "targets": report.targets(results),
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=1))
    return summary


def merged(paths: list[str]) -> dict[str, Any]:
    """`bench.py report A.json B.json`: the results of several runs (e.g. one per N) as one summary and chart."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    results = sorted((r for run in runs for r in run["results"]), key=lambda r: r["n"])
    chart = Path(os.environ.get("BENCH_CHART") or Path(paths[0]).with_name("bench-merged.png"))
    report.chart(results, chart)
    return {**runs[-1], "chart": str(chart), "results": results, "targets": report.targets(results),
            "runs": [{k: run.get(k) for k in ("date", "machine", "duration_s")} for run in runs]}


async def until_sigterm(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """`work`, cancelled by a SIGTERM (a cancelled CI job, `kill`) as asyncio.run cancels it on Ctrl-C, so that the
    context managers that started clusters and processes stop them on the way out."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main() -> int:
    if sys.argv[1:2] == ["report"]:
        summary = merged(sys.argv[2:])
    else:
        try:
            summary = asyncio.run(until_sigterm(main_async()))
        except asyncio.CancelledError:
            print("bench: stopped by SIGTERM; what it started is stopped and removed", file=sys.stderr)
            return 128 + signal.SIGTERM
    print(report.table(summary["results"]))
    print()
    for t in summary["targets"]:
        print(f"  {t['status']:8} {t['target']}: {json.dumps(t['figures'])}")
    print(f"\nchart: {summary['chart']}")
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
