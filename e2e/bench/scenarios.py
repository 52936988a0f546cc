"""The scenarios, on one cluster each: the limit client's, then the operator's.

Every figure is measured from outside the operator: wall time from watch timestamps, requests at the API
server (e2e/bench/counting.py), CPU and memory from /proc (e2e/bench/process.py), warning lines from its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e.bench import counting, manifests
from e2e.bench.client import Api, ApiError, bounded
from e2e.bench.process import OperatorProcess
from e2e.bench.tracker import Tracker, is_ready
from kaos_modelapi import crd as kaos_crd
from kaos_modelapi.cli import KUBE_API_IN_FLIGHT
from kaos_modelapi.settings import GatewayRef, Settings

REPO = Path(__file__).resolve().parents[2]
GATEWAY = GatewayRef("bench-gateway", counting.NAMESPACE)
DEFAULT_OPERATOR = (
    "{python} -m kaos_modelapi run --kubeconfig {kubeconfig} --resync-period {resync}"
    " --metrics-bind-address 127.0.0.1:{metrics_port} --health-probe-bind-address 0"
    f" --gateway-name {GATEWAY.name} --gateway-namespace {GATEWAY.namespace} --log-format json --log-level info"
)
# The limit client (e2e/bench/limit.py) as its own process, started from the repository like the operator.
LIMIT = ("{python} -m e2e.bench.limit --kubeconfig {kubeconfig} --namespace {namespace} --workers {workers}"
         f" --gateway-name {GATEWAY.name} --gateway-namespace {GATEWAY.namespace}")
IDLE_RESYNC = 3600  # seconds: no resync during the other scenarios
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE")


@dataclass
class Options:
    operator: str = DEFAULT_OPERATOR
    python: str = sys.executable  # {python}: the operator's and the limit client's interpreter
    crd: str = ""  # a file; empty: `kaos-modelapi crd`
    workers: int = KUBE_API_IN_FLIGHT  # the limit client's, as the operator's requests in flight
    noise: tuple[int, int, int] = (5000, 1000, 2000)  # ConfigMaps, Deployments, Secrets
    resync_floor: float = 15.0
    propagation_samples: int = 10
    # Rounds of the user's apply, with the operator running and without, in random order; None: `apply_rounds`.
    apply_rounds: int | None = None
    full: bool = True  # False: cold, update, restart and resync only
    smoke: bool = False  # True (the smoke test): start-up and cold only
    prefix: str = "bench"  # of every namespace the scenarios make

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"


def apply_rounds(n: int) -> int:
    """Enough rounds that the medians tell 5 % apart: an apply of 100 lasts about a second, and its runs on one
    cluster spread by 0.2-0.4 s (three a side could not tell the operator's effect from that); at 500 and 1000
    single rounds spread by 20-40 %, and the medians of three a side crossed a ratio of 1.1 about once a full
    run: 5 from N=160 (about 2 minutes more at 500 and 3 at 1000)."""
    return max(5, round(800 / n))


def kubectl_apply(kubeconfig: str, docs: list[dict[str, Any]]) -> float:
    """The user's own `kubectl apply -f` of these objects; its wall time."""
    began = time.monotonic()
    # kubectl applies one object after another: 1000 took over 300 s on the loaded machine.
    counting.kubectl(kubeconfig, "apply", "-f", "-", stdin=manifests.dump(docs), timeout=300 + 2 * len(docs))
    return time.monotonic() - began


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def by_kind(counts: Counter[str], n: int) -> dict[str, float]:
    """Writes per ModelAPI, by resource."""
    out: Counter[str] = Counter()
    for key, value in counts.items():
        verb, resource = key.split()
        if verb in counting.WRITE_VERBS:
            out[resource] += value
    return {k: round(v / n, 2) for k, v in sorted(out.items())}


def requests_table(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items()))


async def refused_writes(api: Api) -> int:
    """Write requests the API server refused (4xx), all clients: apiserver_request_total by code."""
    total = 0
    for line in (await api.raw("/metrics")).splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        verb = re.search(r'verb="([A-Z]+)"', line)
        code = re.search(r'code="(\d+)"', line)
        if verb and code and verb.group(1) in WRITE_VERBS and code.group(1) in ("403", "409", "422"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def established(admin: Api, crd: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = await admin.get("CustomResourceDefinition", None, crd)
        if any(c.get("type") == "Established" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or []):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"CRD {crd} not established after {timeout:.0f} s")


@dataclass
class Cluster:
    """One cluster's setup: the CRD, the measured identities and an admin client."""

    kubeconfig: str
    folder: Path
    admin: Api
    identities: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def setup(cls, kubeconfig: str, options: Options, actors: list[str]) -> Cluster:
        folder = counting.scratch()
        crd = Path(options.crd).read_text() if options.crd else kaos_crd.crd_yaml()  # `kaos-modelapi crd`
        # Ours client-side, as a user and the tests do; another operator's server-side: KAOS's CRDs embed the whole
        # PodSpec schema, over the 256 KiB annotation a client-side apply keeps.
        counting.kubectl(kubeconfig, "apply", *(["--server-side"] if options.crd else []), "-f", "-", stdin=crd)
        admin = await Api.from_kubeconfig(kubeconfig)
        await counting.ensure_namespace(admin)
        identities = {a: await counting.identity(admin, kubeconfig, a, folder, options.ns("canary")) for a in actors}
        names = [doc["metadata"]["name"] for doc in yaml.safe_load_all(crd) if doc and doc.get("kind") ==
                 "CustomResourceDefinition"]
        for name in names:
            await established(admin, name)
        return cls(kubeconfig, folder, admin, identities)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, kubeconfig: str, options: Options, actors: list[str]) -> AsyncIterator[Cluster]:
        """setup(), and afterwards the admin client closed and the scratch folder (the identities' credentials,
        the operator's log) removed; after a failure (not a stop) the folder is kept, for its logs, and named."""
        c = await cls.setup(kubeconfig, options, actors)
        failed = False
        try:
            yield c
        except Exception:  # (not a stop by Ctrl-C or SIGTERM: nothing to look into then)
            failed = True
            print(f"bench: the operator's log and credentials are kept in {c.folder}", file=sys.stderr)
            raise
        finally:
            if not failed:
                shutil.rmtree(c.folder, ignore_errors=True)
            await c.admin.close()

    async def namespace(self, name: str) -> None:
        await counting.ensure_namespace(self.admin, name)

    async def counts(self) -> dict[str, Counter[str]]:
        return await counting.snapshot(self.admin)

    async def deployments(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await self.admin.get("Deployment", namespace)).get("items", [])
        return items

    async def gone(self, namespace: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await self.admin.request("GET", f"/api/v1/namespaces/{namespace}", missing_ok=True):
                return time.monotonic()
            await asyncio.sleep(0.5)
        raise TimeoutError(f"namespace {namespace} still there after {timeout:.0f} s")


# --- converging a set of ModelAPIs (the operator's or the limit's) ----------------------------------------------


async def converge(c: Cluster, actor: str, namespace: str, n: int, revision: int,
                   tracker: Tracker, op: OperatorProcess | None, prefix: str = "m") -> dict[str, Any]:
    """Apply N ModelAPIs named `prefix`-i (revision 0: create; > 0: change every spec) and time the
    convergence."""
    if revision:
        tracker.reset(await c.deployments(namespace))
    before, cpu0 = await c.counts(), op.cpu() if op else 0.0
    if op:
        op.reset_peak()
    began = time.monotonic()
    docs = manifests.modelapis(n, namespace, revision, prefix)
    apply_s = await asyncio.to_thread(kubectl_apply, c.kubeconfig, docs)
    timeout = 120 + n * 0.6
    try:
        return await _converged(c, actor, n, revision, tracker, op, began, apply_s, before, cpu0, timeout)
    except TimeoutError as e:
        ready = sum(1 for m in tracker.modelapis.values() if is_ready(m))
        raise TimeoutError(f"{e} ({tracker.count('status')} with a status for their generation, {ready} Ready, "
                           f"{tracker.count('rolled')} rolled out)") from None


async def _converged(c: Cluster, actor: str, n: int, revision: int, tracker: Tracker, op: OperatorProcess | None,
                     began: float, apply_s: float, before: dict[str, Counter[str]], cpu0: float,
                     timeout: float) -> dict[str, Any]:
    await tracker.until(lambda: tracker.count("status") >= n and tracker.count("deployment") >= n,
                        timeout, f"{n} ModelAPIs with children and a status")
    written = max(tracker.last("status"), tracker.last("deployment"))
    if revision:
        await tracker.until(lambda: tracker.count("rolled") >= n, timeout, f"{n} Deployments rolled out")
    await tracker.until(lambda: sum(1 for m in tracker.modelapis.values() if is_ready(m)) >= n, timeout,
                        f"{n} ModelAPIs Ready")
    ready = max(tracker.last("ready"), tracker.last("rolled") if revision else 0.0)
    end = await op.wait_quiet() if op else time.monotonic()
    counts = counting.delta(await c.counts(), before, actor)
    propagation = tracker.propagation_ms()
    result: dict[str, Any] = {
        "apply_s": round(apply_s, 2),
        "children_and_status_s": round(written - began, 2),
        "ready_s": round(ready - began, 2),
        "ready_after_apply_s": round(ready - began - apply_s, 2),  # the part the user's kubectl apply does not hide
        "work_s": round(max(end, ready) - began, 2),
        "writes": counting.writes(counts),
        "writes_per_modelapi": round(counting.writes(counts) / n, 2),
        "writes_per_modelapi_by_resource": by_kind(counts, n),
        "children_per_modelapi": children_per_modelapi(n),
        "events": counting.writes(counts, "events"),
        "requests": requests_table(counts),
        "propagation_ms": {"samples": len(propagation), "p50": percentile(propagation, 0.5),
                           "p99": percentile(propagation, 0.99)},
    }
    if op:
        result["cpu_s"] = round(op.cpu() - cpu0, 2)
        result["cpu_ms_per_modelapi"] = round((op.cpu() - cpu0) * 1000 / n, 2)
        result["peak_rss_mib"] = round(op.peak_mib(), 1)
        result["rss_mib"] = round(op.rss_mib(), 1)
    return result


def children_per_modelapi(n: int) -> float | None:
    """What the operator creates for the mix, on average (kaos_modelapi.desired): the floor of cold writes. None
    for a mix spelled for another CRD (BENCH_MIX=peer-kaos), which this operator's model does not read."""
    from kaos_modelapi import desired
    from kaos_modelapi.api import ModelAPI

    if manifests.mix() == "peer-kaos":
        return None

    settings = Settings(gateway=GATEWAY)
    total = 0
    for doc in manifests.modelapis(n, "x"):
        doc["metadata"]["uid"] = "0"
        total += len(desired.build(ModelAPI.model_validate(doc), settings).children)
    return round(total / n, 2)


async def tracked(c: Cluster, namespace: str) -> Tracker:
    await c.namespace(namespace)
    tracker = Tracker(c.admin, namespace)
    await tracker.start()
    return tracker


# --- the limit -------------------------------------------------------------------------------------------------


async def start_limit(c: Cluster, namespace: str, options: Options) -> OperatorProcess:
    """The limit client's process, watching `namespace` (both its watches have listed when this returns, so
    its start-up is not counted in a scenario)."""
    proc = OperatorProcess.from_template(LIMIT, c.folder / f"limit-{namespace}.log", python=options.python,
                                         kubeconfig=c.identities["limit"], namespace=namespace,
                                         workers=str(options.workers))
    proc.cwd = REPO
    proc.mark_log()
    proc.start()
    try:
        await proc.wait_log('"event": "ready"', 120)
        await proc.wait_quiet(quiet_for=0.5)
    except BaseException:
        proc.stop()
        raise
    return proc


def limit_errors(proc: OperatorProcess) -> dict[str, Any]:
    """The requests the limit client logged as failed (each retried when the server may take it later), and the
    statuses it wrote again because an older write of theirs had landed last."""
    lines = proc.warning_lines()
    return {"errors": len(lines), "first_errors": [line[:300] for line in lines[:5]],
            "statuses_rewritten": proc.log_text().count('"event": "status-lost"')}


async def limit_scenarios(c: Cluster, n: int, options: Options) -> dict[str, Any]:
    namespace = options.ns("limit")
    tracker = await tracked(c, namespace)
    proc = await start_limit(c, namespace, options)
    out: dict[str, Any] = {}
    try:
        # A limit that does not converge is reported (and the operator still measured), as the operator's.
        cold = await attempt(out, "cold", converge(c, "limit", namespace, n, 0, tracker, proc))
        if "error" not in cold:
            await attempt(out, "update", converge(c, "limit", namespace, n, 1, tracker, proc))
    finally:
        out.update(limit_errors(proc))
        proc.stop()
        await tracker.stop()
    return out


async def plain_apply(c: Cluster, n: int, namespace: str) -> float:
    """kubectl apply of N ModelAPIs with no operator running. One first, untimed: kubectl's discovery cache of a
    new cluster is empty and the CRD's OpenAPI may still be being published (the operator's cluster has had its
    canary applied by then)."""
    # Watched by a Tracker as the operator's and the limit's applies are: its watch costs the API server too.
    tracker = await tracked(c, namespace)
    try:
        await asyncio.to_thread(kubectl_apply, c.kubeconfig, [manifests.modelapi(0, namespace, prefix="warm-up")])
        return round(await asyncio.to_thread(kubectl_apply, c.kubeconfig, manifests.modelapis(n, namespace)), 2)
    finally:
        await tracker.stop()


# --- the operator ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    c: Cluster
    options: Options
    op: OperatorProcess
    canary: Tracker
    canaries: int = 0

    @classmethod
    async def create(cls, c: Cluster, options: Options) -> Run:
        log = c.folder / "operator.log"
        op = OperatorProcess.from_template(options.operator, log, python=options.python,
                                           kubeconfig=c.identities["operator"], resync=str(IDLE_RESYNC))
        return cls(c, options, op, await tracked(c, options.ns("canary")))

    def _with_resync(self, seconds: float) -> None:
        self.op = OperatorProcess.from_template(
            self.options.operator, self.op.log_path, python=self.options.python,
            kubeconfig=self.c.identities["operator"], resync=str(round(seconds)))

    async def start(self, resync: float = IDLE_RESYNC) -> dict[str, Any]:
        """Start the operator with one new canary ModelAPI waiting: time to its status (the first reconcile), the
        requests until the operator is idle (the canary's own are counted apart), idle memory."""
        self._with_resync(resync)
        self.canaries += 1
        name = f"canary-{self.canaries}"
        canary = manifests.modelapi(4, self.options.ns("canary"), prefix=name)
        await asyncio.to_thread(kubectl_apply, self.c.kubeconfig, [canary])
        before = await self.c.counts()
        began = self.op.start()
        first = await self.canary.until(lambda: self.canary.times.get(f"{name}-4") is not None
                                        and self.canary.times[f"{name}-4"].status is not None, 120,
                                        "the canary's status")
        end = await self.op.wait_quiet()
        counts = counting.delta(await self.c.counts(), before, "operator")
        return {
            "first_reconcile_s": round(first - began, 2),
            "until_idle_s": round(end - began, 2),
            "lists": counting.requests_of(counts, ("list",)),
            "watches": counting.requests_of(counts, ("watch",)),
            "gets": counting.requests_of(counts, ("get",)),
            "writes": counting.writes(counts),
            "requests": requests_table(counts),
            "cpu_s": round(self.op.cpu(), 2),
            "rss_mib": round(self.op.rss_mib(), 1),
        }

    async def applies(self, n: int, rounds: int) -> dict[str, Any]:
        """The user's `kubectl apply` of N ModelAPIs on this cluster with the operator running and without it,
        `rounds` of each in random order, each into a namespace of its own deleted before the next: the same
        cluster and its same state, so the two differ by the operator alone (one run each on two fresh clusters
        differed by 20-40 % at N=100 with no operator in either)."""
        times: dict[str, list[float]] = {"with": [], "without": []}
        for k in range(rounds):
            for mode in random.sample(sorted(times), 2):
                if mode == "with":
                    await self.start()
                namespace = self.options.ns(f"apply-{mode}-{k}")
                await self.c.namespace(namespace)
                times[mode].append(round(await asyncio.to_thread(kubectl_apply, self.c.kubeconfig,
                                                                 manifests.modelapis(n, namespace)), 2))
                if mode == "with":
                    self.op.stop()  # (what it does after the apply returned is not the user's wait)
                await self.c.admin.request("DELETE", f"/api/v1/namespaces/{namespace}")
                await self.c.gone(namespace, 300 + n)
        with_s, without_s = (round(statistics.median(times[mode]), 2) for mode in ("with", "without"))
        return {"with_s": times["with"], "without_s": times["without"], "median_with_s": with_s,
                "median_without_s": without_s, "ratio": round(with_s / without_s, 2)}

    async def idle_window(self, until: float) -> dict[str, Any]:
        """Requests, writes and CPU from now until `until` (monotonic) and then quiet."""
        before, cpu0 = await self.c.counts(), self.op.cpu()
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        await self.op.wait_quiet()
        counts = counting.delta(await self.c.counts(), before, "operator")
        return {"writes": counting.writes(counts), "requests": requests_table(counts),
                "cpu_s": round(self.op.cpu() - cpu0, 2)}

    async def noise(self, namespace: str) -> dict[str, Any]:
        """A burst of unrelated objects while the operator idles on the converged set."""
        await self.c.namespace(namespace)
        before, cpu0, rss0 = await self.c.counts(), self.op.cpu(), self.op.rss_mib()
        objs = manifests.noise(namespace, *self.options.noise)
        began = time.monotonic()
        await bounded([lambda o=o: self.c.admin.create(o) for o in objs], 16)  # type: ignore[misc]
        created = time.monotonic()
        await self.op.wait_quiet()
        counts = counting.delta(await self.c.counts(), before, "operator")
        return {"objects": len(objs), "create_s": round(created - began, 1), "writes": counting.writes(counts),
                "requests": requests_table(counts), "cpu_s": round(self.op.cpu() - cpu0, 2),
                "rss_added_mib": round(self.op.rss_mib() - rss0, 1)}

    async def propagation(self, samples: int) -> dict[str, Any]:
        """One ModelAPI at a time on the idle operator: its Deployment rolled out -> the ModelAPI Ready."""
        namespace = self.options.ns("propagation")
        tracker = await tracked(self.c, namespace)
        try:
            for i in range(samples):
                await asyncio.to_thread(kubectl_apply, self.c.kubeconfig,
                                        [manifests.modelapi(i, namespace, prefix="p")])
                await tracker.until(lambda i=i: (t := tracker.times.get(f"p-{i}")) is not None
                                    and t.ready_after_rolled is not None, 60, f"p-{i} Ready")
            values = tracker.propagation_ms()
        finally:
            await tracker.stop()
        return {"samples": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                "max": max(values) if values else None}

    async def delete_namespaces(self, namespaces: list[str], n: int) -> dict[str, Any]:
        self.op.mark_log()
        before, refused0 = await self.c.counts(), await refused_writes(self.c.admin)
        own0 = self.op.refused_writes()
        began = time.monotonic()
        for ns in namespaces:
            await self.c.admin.request("DELETE", f"/api/v1/namespaces/{ns}")
        for ns in namespaces:
            await self.c.gone(ns, 300 + n)
        gone = time.monotonic()
        await self.op.wait_quiet()
        counts = counting.delta(await self.c.counts(), before, "operator")
        warnings, own = self.op.warning_lines(), self.op.refused_writes()
        return {"modelapis": n * len(namespaces), "namespaces_gone_s": round(gone - began, 1),
                "writes": counting.writes(counts), "requests": requests_table(counts),
                "refused_writes": None if own is None or own0 is None else own - own0,
                "refused_writes_all_clients": await refused_writes(self.c.admin) - refused0,
                "warning_lines": len(warnings), "first_warning": warnings[0][:300] if warnings else ""}


async def attempt(out: dict[str, Any], name: str, scenario: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario; one that times out (a ModelAPI that never converges) is reported, and the next runs."""
    try:
        out[name] = await scenario
    except (TimeoutError, ApiError) as e:
        out[name] = {"error": str(e)}
        print(f"scenario {name} failed: {e}", file=sys.stderr, flush=True)
    result: dict[str, Any] = out[name]
    return result


async def converge_in(c: Cluster, namespace: str, n: int, revisions: list[int],
                      op: OperatorProcess, prefix: str = "m") -> list[dict[str, Any]]:
    tracker = await tracked(c, namespace)
    out: dict[str, Any] = {}
    try:
        for revision in revisions:
            await attempt(out, str(revision), converge(c, "operator", namespace, n, revision, tracker, op, prefix))
    finally:
        await tracker.stop()
    return [out[str(r)] for r in revisions]


async def operator_scenarios(c: Cluster, n: int, options: Options) -> dict[str, Any]:
    run = await Run.create(c, options)
    out: dict[str, Any] = {}
    try:
        idle = (await run.start())
        out["startup_empty"] = idle
        results = await converge_in(c, options.ns("op"), n, [0] if options.smoke else [0, 1], run.op)
        out["cold"] = results[0]
        if "rss_mib" in out["cold"]:
            out["cold"]["rss_above_idle_kib_per_modelapi"] = round((out["cold"]["rss_mib"] - idle["rss_mib"])
                                                                   * 1024 / n, 1)
        if len(results) > 1:
            out["update"] = results[1]
        if options.smoke:
            return out
        if options.full:
            await attempt(out, "propagation", run.propagation(options.propagation_samples))
        # The restart and the resync on the N converged (before the noise scenario adds N more and 8,000
        # unrelated objects).
        run.op.stop()
        restart = await attempt(out, "restart", run.start())
        # The resync: a start whose resync period ends once the start's own work is done, then that window.
        resync = max(options.resync_floor, restart.get("until_idle_s", 30) * 2 + 5)
        run.op.stop()
        started = await run.start(resync)
        # Its resync timer starts at the latest when it is idle (caches synced): the window covers one period.
        await attempt(out, "resync", run.idle_window(run.op.started_at + started["until_idle_s"] + resync + 2))
        out["resync"]["period_s"] = round(resync)
        if options.full:
            run.op.stop()
            await run.start()
            await attempt(out, "noise_burst", run.noise(options.ns("noise")))
            out["noise_cold"] = (await converge_in(c, options.ns("noisy"), n, [0], run.op))[0]
            await attempt(out, "namespace_deletion",
                          run.delete_namespaces([options.ns("op"), options.ns("noisy")], n))
            run.op.stop()
            if rounds := (apply_rounds(n) if options.apply_rounds is None else options.apply_rounds):
                await attempt(out, "apply", run.applies(n, rounds))
    finally:
        run.op.stop()
        await run.canary.stop()
    return out

