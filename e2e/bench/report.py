"""The table, the targets of issue 14 (met / not met), the chart. Figures only: nothing here fails a run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# KAOS's Go operator on the same control plane and manifests (issue 14): apply -> all Ready, seconds.
PEER_READY_S = {100: 7.9, 500: 28.4}

Row = tuple[str, Callable[[dict[str, Any]], Any]]


def _get(result: dict[str, Any], *keys: str) -> Any:
    value: Any = result
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def efficiency(result: dict[str, Any], scenario: str = "cold") -> float | None:
    limit, ours = _get(result, "limit", scenario, "ready_s"), _get(result, "operator", scenario, "ready_s")
    return round(limit / ours, 2) if limit and ours else None


def _operator(*keys: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: _get(r, "operator", *keys)


def _limit(*keys: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: _get(r, "limit", *keys)


ROWS: list[Row] = [
    ("kubectl apply, no operator (s)", lambda r: r.get("apply_without_operator_s")),
    ("kubectl apply, with operator (s)", _operator("cold", "apply_s")),
    ("kubectl apply, same cluster, without / with (median, s)",
     lambda r: _two(_get(r, "operator", "apply"), "median_without_s", "median_with_s")),
    ("start-up to first reconcile (s)", _operator("startup_empty", "first_reconcile_s")),
    ("start-up, N converged: first reconcile (s)", _operator("restart", "first_reconcile_s")),
    ("start-up requests: LIST / WATCH / GET", lambda r: "/".join(str(_get(r, "operator", "restart", k))
                                                                  for k in ("lists", "watches", "gets"))),
    ("idle RSS (MiB)", _operator("startup_empty", "rss_mib")),
    ("cold: children+status, operator (s)", _operator("cold", "children_and_status_s")),
    ("cold: children+status, limit (s)", _limit("cold", "children_and_status_s")),
    ("cold: all Ready, operator (s)", _operator("cold", "ready_s")),
    ("cold: all Ready, limit (s)", _limit("cold", "ready_s")),
    ("cold: Ready after apply returned, operator (s)", _operator("cold", "ready_after_apply_s")),
    ("cold: Ready after apply returned, limit (s)", _limit("cold", "ready_after_apply_s")),
    ("cold: efficiency (limit/operator)", lambda r: efficiency(r)),
    ("cold: operator CPU (s)", _operator("cold", "cpu_s")),
    ("cold: limit CPU (s)", _limit("cold", "cpu_s")),
    ("cold: CPU per ModelAPI (ms)", _operator("cold", "cpu_ms_per_modelapi")),
    ("cold: CPU per ModelAPI, limit (ms)", _limit("cold", "cpu_ms_per_modelapi")),
    ("cold: writes per ModelAPI, operator", _operator("cold", "writes_per_modelapi")),
    ("cold: writes per ModelAPI, limit", _limit("cold", "writes_per_modelapi")),
    ("cold: Events written", _operator("cold", "events")),
    ("cold: peak RSS (MiB)", _operator("cold", "peak_rss_mib")),
    ("cold: RSS above idle per ModelAPI (KiB)", _operator("cold", "rss_above_idle_kib_per_modelapi")),
    ("cold: propagation p50/p99 (ms)", lambda r: _pair(_get(r, "operator", "cold", "propagation_ms"))),
    ("update: all rolled+Ready, operator (s)", _operator("update", "ready_s")),
    ("update: all rolled+Ready, limit (s)", _limit("update", "ready_s")),
    ("update: efficiency (limit/operator)", lambda r: efficiency(r, "update")),
    ("update: CPU (s)", _operator("update", "cpu_s")),
    ("update: CPU, limit (s)", _limit("update", "cpu_s")),
    ("update: writes per ModelAPI, operator", _operator("update", "writes_per_modelapi")),
    ("update: writes per ModelAPI, limit", _limit("update", "writes_per_modelapi")),
    ("update: Events written", _operator("update", "events")),
    ("propagation, idle operator p50/p99 (ms)", lambda r: _pair(_get(r, "operator", "propagation"))),
    ("restart: writes", _operator("restart", "writes")),
    ("restart: until idle (s)", _operator("restart", "until_idle_s")),
    ("resync: writes", _operator("resync", "writes")),
    ("resync: CPU (s)", _operator("resync", "cpu_s")),
    ("noise burst: writes", _operator("noise_burst", "writes")),
    ("noise burst: RSS added (MiB)", _operator("noise_burst", "rss_added_mib")),
    ("noise: cold all Ready (s)", _operator("noise_cold", "ready_s")),
    ("noise: cold CPU (s)", _operator("noise_cold", "cpu_s")),
    ("namespace deletion: operator writes", _operator("namespace_deletion", "writes")),
    ("namespace deletion: refused writes", _operator("namespace_deletion", "refused_writes")),
    ("namespace deletion: refused, all clients", _operator("namespace_deletion", "refused_writes_all_clients")),
    ("namespace deletion: warning lines", _operator("namespace_deletion", "warning_lines")),
]


def _pair(p: dict[str, Any] | None) -> str | None:
    if not p or p.get("p50") is None:
        return None
    return f"{p['p50']:.0f}/{p['p99']:.0f}"


def _two(d: dict[str, Any] | None, a: str, b: str) -> str | None:
    return None if not d or d.get(a) is None else f"{d[a]} / {d[b]}"


def table(results: list[dict[str, Any]]) -> str:
    header = ["figure", *(f"N={r['n']}" for r in results)]
    rows = [header] + [[label, *("-" if (v := fn(r)) is None else str(v) for r in results)] for label, fn in ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                      strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _all(values: list[Any], check: Callable[[Any], bool]) -> bool | None:
    present = [v for v in values if v is not None]
    return all(check(v) for v in present) if present else None


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets, each with the figures it was judged on."""
    by_n = {r["n"]: r for r in results}
    op = [r.get("operator", {}) for r in results]
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, figures: Any) -> None:
        out.append({"target": name, "status": _met(ok), "figures": figures})

    # The absolute figures were measured on another machine: each shows the limit's of this run beside the
    # operator's, which says whether this machine can meet it at all.
    for n, peer in PEER_READY_S.items():
        ours = _get(by_n.get(n, {}), "operator", "cold", "ready_s")
        add(f"cold converge at N={n} faster than KAOS ({peer} s)", None if ours is None else ours < peer,
            {"operator": ours, "limit": _get(by_n.get(n, {}), "limit", "cold", "ready_s")})
    eff = efficiency(by_n[1000]) if 1000 in by_n else None
    add("efficiency at N=1000 >= 0.8 of the limit", None if eff is None else eff >= 0.8, eff)
    cpu = [_get(o, "cold", "cpu_ms_per_modelapi") for o in op]
    add("operator CPU <= 8 ms per ModelAPI on cold converge", _all(cpu, lambda v: v <= 8),
        {"operator": cpu, "limit": [_get(r, "limit", "cold", "cpu_ms_per_modelapi") for r in results]})
    writes = [(_get(r, "operator", "cold", "writes_per_modelapi_by_resource") or {}) for r in results]
    extra = [_cold_write_excess(w, _get(r, "operator", "cold", "children_per_modelapi"))
             for w, r in zip(writes, results, strict=True)]
    add("cold writes per ModelAPI: children + 2 statuses, Events only for state changes (<= 2)",
        _all(extra, lambda v: v <= 0), writes)
    for scenario in ("restart", "resync", "noise_burst"):
        w = [_get(o, scenario, "writes") for o in op]
        add(f"writes on {scenario.replace('_', ' ')}: 0", _all(w, lambda v: v == 0), w)
    startup = [(_get(o, "restart", "lists"), _get(o, "restart", "watches"), _get(o, "restart", "gets")) for o in op]
    constant = len({s for s in startup if None not in s}) == 1 if startup else None
    add("start-up requests: the same LISTs and WATCHes at every N, no GET per object",
        None if len(startup) < 2 else constant and all((s[2] or 0) < 10 for s in startup), startup)
    dels = [(_get(o, "namespace_deletion", "refused_writes"),
             _get(o, "namespace_deletion", "warning_lines")) for o in op]
    add("namespace deletion: no refused write, no warning line",
        _all([d for d in dels if None not in d], lambda d: d == (0, 0)), dels)
    # The alternating rounds on one cluster when they ran (a full run), else the one apply on each fresh cluster.
    ratio = [_get(r, "operator", "apply", "ratio")
             or _ratio(_get(r, "operator", "cold", "apply_s"), r.get("apply_without_operator_s")) for r in results]
    add("kubectl apply with the operator no slower than without (ratio <= 1.1)", _all(ratio, lambda v: v <= 1.1),
        ratio)
    peak = _get(by_n.get(1000, {}), "operator", "cold", "peak_rss_mib")
    add("peak RSS at N=1000 <= 150 MiB", None if peak is None else peak <= 150, peak)
    per = [_get(o, "cold", "rss_above_idle_kib_per_modelapi") for o in op]
    add("RSS above idle <= 30 KiB per ModelAPI", _all(per, lambda v: v <= 30), per)
    noise = [_get(o, "noise_burst", "rss_added_mib") for o in op]
    add("noise adds < 10 MiB", _all(noise, lambda v: v < 10), noise)
    p99 = [_get(o, "propagation", "p99") for o in op]
    add("readiness propagation p99 <= 100 ms (idle operator)", _all(p99, lambda v: v <= 100), p99)
    first = [_get(o, "startup_empty", "first_reconcile_s") for o in op]
    add("start-up to first reconcile <= 2 s", _all(first, lambda v: v <= 2), first)
    failed = failures(results)
    add("every scenario converged", not failed, failed)
    return out


def failures(results: list[dict[str, Any]]) -> list[str]:
    """Scenarios that did not finish (e.g. a ModelAPI that never converged), as "N=... who.scenario: why"."""
    found = []
    for r in results:
        for who in ("limit", "operator"):
            for name, value in (r.get(who) or {}).items():
                if isinstance(value, dict) and "error" in value:
                    found.append(f"N={r['n']} {who}.{name}: {value['error']}")
    return found


def _cold_write_excess(by_resource: dict[str, float], expected_children: float | None) -> float | None:
    """Writes per ModelAPI beyond its children, two statuses and two Events (None without figures)."""
    if not by_resource or expected_children is None:
        return None
    children = sum(v for k, v in by_resource.items() if k not in ("modelapis/status", "events"))
    excess = (children - expected_children) + max(0.0, by_resource.get("modelapis/status", 0) - 2) + \
        max(0.0, by_resource.get("events", 0) - 2)
    return round(excess, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def chart(results: list[dict[str, Any]], target: Path) -> Path | None:
    """Converge time and writes per ModelAPI against N, operator and limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for who, style in (("operator", "o-"), ("limit", "s--")):
        ready = [_get(r, who, "cold", "ready_s") for r in results]
        update = [_get(r, who, "update", "ready_s") for r in results]
        writes = [_get(r, who, "cold", "writes_per_modelapi") for r in results]
        left.plot(ns, ready, style, label=f"{who}: cold, all Ready")
        left.plot(ns, update, style, alpha=0.5, label=f"{who}: update, all rolled")
        right.plot(ns, writes, style, label=f"{who}: cold")
    peer = sorted(PEER_READY_S.items())
    left.plot([p[0] for p in peer], [p[1] for p in peer], "x:", label="KAOS (Go), cold (issue 14)")
    left.set(xlabel="ModelAPIs (N)", ylabel="seconds", title="Converge time")
    right.set(xlabel="ModelAPIs (N)", ylabel="writes per ModelAPI", title="Writes to converge (API server count)")
    for ax in (left, right):
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # (headroom: the highest line would lie on the frame)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
