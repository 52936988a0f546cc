"""The benchmark's interpreter for the operator and the limit client: BENCH_PYTHON, or the harness's own."""

from __future__ import annotations

import sys

import pytest

from e2e.bench import bench


def test_the_operator_runs_on_the_harness_interpreter_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_PYTHON", raising=False)
    assert bench.options_from_env().python == sys.executable
    monkeypatch.setenv("BENCH_PYTHON", "/opt/runtime/bin/python")
    assert bench.options_from_env().python == "/opt/runtime/bin/python"


def test_the_summary_names_the_operator_interpreter_and_its_version() -> None:
    said = bench.interpreter(sys.executable)
    assert said.startswith(f"{sys.executable}: {sys.version.split()[0]}")
