"""The operator's metrics: each reconcile counted once under controller-runtime's names and results."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kaos_modelapi.observability import Metrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, {"controller": "modelapi", **labels})
    return 0.0 if found is None else found


def test_each_reconcile_counts_once_by_result_and_errors_apart() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "modelapi")
    for result, terminal in (("success", False), ("success", False), ("requeue_after", False), ("error", False),
                             ("error", True), (None, False)):
        metrics.reconcile_started()
        metrics.reconcile_ended(result, 0.01, terminal=terminal)

    assert [value(registry, "controller_runtime_reconcile_total", result=r)
            for r in ("success", "requeue_after", "requeue", "error")] == [2, 1, 0, 2]
    assert value(registry, "controller_runtime_reconcile_errors_total") == 2
    assert value(registry, "controller_runtime_terminal_reconcile_errors_total") == 1
    # A reconcile cancelled at shutdown has a duration but no result.
    assert value(registry, "controller_runtime_reconcile_time_seconds_count") == 6
    assert value(registry, "controller_runtime_active_workers") == 0


def test_requests_are_counted_by_code_and_method() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "modelapi")
    for method, code in (("patch", 200), ("PATCH", 200), ("get", 404)):
        metrics.on_response(method, code)
    assert registry.get_sample_value("rest_client_requests_total", {"code": "200", "method": "PATCH"}) == 2
    assert registry.get_sample_value("rest_client_requests_total", {"code": "404", "method": "GET"}) == 1


def test_requests_waiting_for_the_lane_are_read_when_scraped() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "modelapi")
    waiting = [3]
    metrics.track_waiting(lambda: waiting[0])
    assert registry.get_sample_value("kaos_modelapi_api_requests_waiting") == 3
    waiting[0] = 0
    assert registry.get_sample_value("kaos_modelapi_api_requests_waiting") == 0
