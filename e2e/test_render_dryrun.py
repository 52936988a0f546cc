"""What `kaos-modelapi render` prints is accepted by a real API server (server-side dry-run), for every example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from e2e.operator_process import GATEWAY_NAME, GATEWAY_NAMESPACE, REPO, Kubectl

pytestmark = pytest.mark.cluster

SAMPLES = sorted(p for p in (REPO / "config" / "samples").glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
async def test_rendered_children_pass_server_side_dry_run(sample: Path, kubectl: Kubectl, namespace: str) -> None:
    rendered = subprocess.run(
        [sys.executable, "-m", "kaos_modelapi", "render", "-f", str(sample),
         "--gateway-name", GATEWAY_NAME, "--gateway-namespace", GATEWAY_NAMESPACE],
        capture_output=True, text=True, check=True).stdout
    rendered = rendered.replace("namespace: default", f"namespace: {namespace}")
    done = kubectl.run("apply", "--dry-run=server", "--server-side", "--field-manager=kaos-modelapi",
                       "-n", namespace, "-f", "-", stdin=rendered, check=False)
    assert done.returncode == 0, done.stderr
    kinds = {line.split("/")[0].split(".")[0] for line in done.stdout.splitlines()}
    assert {"deployment", "service", "httproute"} <= kinds, done.stdout
