"""The bench's memory tracer (e2e/bench/memtrace.py): what each cache holds is found in an operator that has
frozen its objects out of the collector's reach, as kaos_modelapi.memory does once the caches are filled."""

from __future__ import annotations

import gc

import structlog

from e2e.bench import memtrace
from kaos_modelapi import kube
from kaos_modelapi.informer import Change, Informer


def test_the_caches_of_an_operator_that_froze_its_objects_are_found() -> None:
    informer = Informer(None, kube.CONFIGMAP, structlog.get_logger())  # type: ignore[arg-type]
    informer.store.apply(Change("add", None, {"apiVersion": "v1", "kind": "ConfigMap",
                                              "metadata": {"name": "a", "namespace": "ns"}, "data": {"k": "v"}}))
    gc.freeze()
    try:
        found = memtrace.caches()
    finally:
        gc.unfreeze()
    assert found["configmaps"]["objects"] >= 1
    assert found["configmaps"]["bytes_per_object"] > 0
