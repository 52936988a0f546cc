"""Smoke test of the benchmark harness (e2e/bench), so that `make bench` does not rot between runs.

Five ModelAPIs on a control plane of its own: the limit client's cold converge, the operator's start-up and cold
converge, then the report (table, targets, JSON, chart). It checks that every figure is there and that the
requests were counted at the API server; it never asserts on a timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from e2e.bench import bench, counting, report, scenarios
from e2e.operator_process import wait_until

ROOT = Path(__file__).resolve().parents[1]

N = 5


async def _limit_cold(c: scenarios.Cluster, options: scenarios.Options) -> dict[str, Any]:
    namespace = options.ns("limit")
    tracker = await scenarios.tracked(c, namespace)
    proc = await scenarios.start_limit(c, namespace, options)
    try:
        return {"cold": await scenarios.converge(c, "limit", namespace, N, 0, tracker, proc),
                **scenarios.limit_errors(proc)}
    finally:
        proc.stop()
        await tracker.stop()


@pytest.mark.cluster
@pytest.mark.timeout(300)
async def test_bench_smoke_reports_every_figure(tmp_path: Path) -> None:
    # On a control plane of its own, as `make bench` measures: on the session's, the session's operator (which
    # watches every namespace, once another test has started it) reconciled the bench's ModelAPIs first.
    options = scenarios.Options(smoke=True)
    async with bench.private_cluster() as kubeconfig, \
            scenarios.Cluster.running(kubeconfig, options, ["limit", "operator"]) as c:
        result: dict[str, Any] = {"n": N, "apply_without_operator_s": 1.0}
        result["limit"] = await _limit_cold(c, options)
        await c.namespace(options.ns("op"))  # before the operator starts watching it
        result["operator"] = await scenarios.operator_scenarios(c, N, options)

    for who in ("limit", "operator"):
        cold = result[who]["cold"]
        assert cold["ready_s"] > 0 and cold["children_and_status_s"] > 0, cold
        # Every ModelAPI's children and statuses were written by this client, and counted as such.
        assert cold["writes_per_modelapi"] >= cold["children_per_modelapi"], cold
        assert cold["requests"].get("patch modelapis/status", 0) >= N, cold["requests"]
    # The limit client ran as its own process: its CPU is read from /proc like the operator's.
    assert {"cpu_s", "cpu_ms_per_modelapi", "peak_rss_mib"} <= result["limit"]["cold"].keys()
    assert result["limit"]["errors"] == 0, result["limit"]["first_errors"]
    cold = result["operator"]["cold"]
    assert {"cpu_s", "cpu_ms_per_modelapi", "peak_rss_mib", "events", "propagation_ms"} <= cold.keys()
    startup = result["operator"]["startup_empty"]
    assert startup["first_reconcile_s"] > 0 and startup["lists"] > 0 and startup["watches"] > 0, startup
    assert startup["requests"].get("any canary", 0) > 0, "the canary's requests are counted apart"

    table = report.table([result])
    assert "cold: all Ready, operator (s)" in table and "N=5" in table
    targets = report.targets([result])
    assert {t["status"] for t in targets} <= {"met", "NOT met", "n/a"}
    assert any(t["status"] != "n/a" for t in targets)
    chart = report.chart([result], tmp_path / "bench.png")
    assert chart is not None and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json.dumps({"results": [result], "targets": targets}))["results"][0]["n"] == N
    assert counting.writes(Counter(cold["requests"])) == cold["writes"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # (gone meanwhile)
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_a_bench_stopped_by_sigterm_stops_and_removes_what_it_started(tmp_path: Path) -> None:
    """A cancelled CI job or a `kill` sends SIGTERM: the control plane the bench started, and its folder, go too."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}  # (a private control plane, as `make bench`)
    env |= {"TMPDIR": str(tmp_path), "BENCH_N": "5", "BENCH_QUICK": "1", "BENCH_OUT": str(tmp_path / "out")}
    log = tmp_path / "bench.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "e2e/bench/bench.py"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: "kubectl apply without an operator" in log.read_text() or proc.poll() is not None, 120,
                   "the bench's control plane up")
        assert proc.poll() is None, log.read_text()
        assert [p.name for p in tmp_path.glob("kaos-bench-cluster-*")], "the control plane's folder"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM, log.read_text()
    finally:
        proc.kill()
    assert not list(tmp_path.glob("kaos-bench-*")), log.read_text()
    assert not _processes_mentioning(str(tmp_path))
