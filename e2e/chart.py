"""The Helm chart as the tests use it: rendered with the pinned helm, its ServiceAccount's credentials."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from e2e.operator_process import GATEWAY_NAME, GATEWAY_NAMESPACE, REPO, Kubectl

CHART = REPO / "charts" / "kaos-modelapi"
Obj = dict[str, Any]


def build_helm() -> str:
    """The helm pinned in hack/helm/go.mod (built once into ~/.cache)."""
    built = subprocess.run([REPO / "hack" / "helm" / "build.sh"], capture_output=True, text=True)
    assert built.returncode == 0, f"building helm failed:\n{built.stderr}"
    return built.stdout.strip()


def render(helm: str, release: str, namespace: str, *flags: str) -> list[Obj]:
    # The chart's settings match the session operator's (e2e/conftest.py): when that operator also serves
    # these namespaces, the two agree on every child instead of fighting over it.
    out = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace,
         "--set", f"gateway.name={GATEWAY_NAME}", "--set", f"gateway.namespace={GATEWAY_NAMESPACE}", *flags],
        capture_output=True, text=True, check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def manifest(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)


def service_account_kubeconfig(kubectl: Kubectl, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig for the same API server that authenticates as the ServiceAccount (a bound token)."""
    token = kubectl.run("create", "token", account, "-n", namespace, "--duration=2h").stdout.strip()
    config = json.loads(kubectl.run("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    user = f"system:serviceaccount:{namespace}:{account}"
    config["users"] = [{"name": user, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = user
    config["contexts"][0]["context"].pop("namespace", None)
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path
