"""`kaos-modelapi render` and `crd`: offline, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted(p for p in (REPO / "config" / "samples").glob("*.yaml") if p.name != "kustomization.yaml")

# The seed document's "Full Specification" block: a field reference that sets both modes' blocks at once.
SEED_FULL_SPEC = """
apiVersion: kaos.tools/v1alpha1
kind: ModelAPI
metadata:
  name: my-modelapi
  namespace: my-namespace
spec:
  mode: Proxy
  proxyConfig:
    apiBase: "http://host.docker.internal:11434"
    model: "ollama/smollm2:135m"
  hostedConfig:
    model: "smollm2:135m"
"""


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kaos_modelapi", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_render_prints_the_children_of_every_sample(sample: Path) -> None:
    done = cli("render", "-f", str(sample), "--gateway-name", "gw", "--gateway-namespace", "infra")
    assert done.returncode == 0, done.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(done.stdout)]
    modelapis = sum(1 for d in yaml.safe_load_all(sample.read_text()) if d["kind"] == "ModelAPI")
    assert kinds.count("Deployment") == kinds.count("Service") == kinds.count("HTTPRoute") == modelapis


def test_the_seeds_reference_example_with_both_blocks_renders_the_block_its_mode_names() -> None:
    done = cli("render", "-f", "-", stdin=SEED_FULL_SPEC)
    assert done.returncode == 0, done.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(done.stdout)]
    assert kinds == ["ConfigMap", "Secret", "Deployment", "Service"]  # Proxy's children, no Ollama


def test_render_reads_stdin_and_uses_image_flags() -> None:
    done = cli("render", "-f", "-", "--litellm-image", "registry.local/litellm:x",
               stdin=(SAMPLES[0].parent / "proxy-mock.yaml").read_text())
    deployment = next(d for d in yaml.safe_load_all(done.stdout) if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/litellm:x"


@pytest.mark.parametrize(("manifest", "expected"), [
    ("kind: ModelAPI\nmetadata: {name: x}\nspec: {mode: Proxy}\n", "spec.proxyConfig"),
    ("kind: ModelAPI\nmetadata: {name: x}\nspec: {mode: Proxy, proxyConfig: {apiBase: 'ftp://x'}}\n",
     "apiBase: must be an absolute http or https URL"),
    ("kind: ModelAPI\nmetadata: {name: x}\nspec: {mode: Hosted, hostedConfig: {model: m}, bogus: 1}\n",
     "spec.bogus"),
    (f"kind: ModelAPI\nmetadata: {{name: {'x' * 55}}}\nspec: {{mode: Proxy, proxyConfig: {{model: m}}}}\n",
     "metadata.name must be at most 54 characters"),
    ("kind: ModelAPI\nmetadata: {name: x}\nspec: {mode: Proxy, proxyConfig: {configYaml: {fromString: '[x'}}}\n",
     "configYaml.fromString is not valid YAML"),
    ("kind: Deployment\nmetadata: {name: x}\n", "no ModelAPI found"),
    ("{: bad", "not valid YAML"),
])
def test_a_bad_file_gets_one_line_naming_the_field_and_exit_2(manifest: str, expected: str) -> None:
    done = cli("render", "-f", "-", stdin=manifest)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr


def test_crd_command_prints_the_crd() -> None:
    done = cli("crd")
    crd = yaml.safe_load(done.stdout)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "modelapis.kaos.tools"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Mode", "Model", "Phase", "Ready", "Endpoint", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "required when mode is Proxy" in spec["properties"]["proxyConfig"]["description"]
    assert spec["properties"]["podSpec"]["properties"]["containers"]["x-kubernetes-list-map-keys"] == ["name"]


def _imports(module: Path) -> set[str]:
    """The kaos_modelapi modules a module imports (relative or absolute), at any depth of its code."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level or base.startswith("kaos_modelapi"):
                base = base.removeprefix("kaos_modelapi").lstrip(".")
                found |= {base} if base else {alias.name for alias in node.names}
    return found


def test_the_command_line_sits_on_top_nothing_imports_it() -> None:
    package = REPO / "kaos_modelapi"
    importers = [p.name for p in package.glob("*.py") if p.stem not in ("cli", "__main__") and "cli" in _imports(p)]
    assert importers == []


def test_the_watch_timeout_is_a_flag_and_must_be_positive() -> None:
    from kaos_modelapi.cli import InputError, build_parser, options_from_args

    assert options_from_args(build_parser().parse_args(["run"])).watch_timeout == 300
    assert options_from_args(build_parser().parse_args(["run", "--watch-timeout", "7"])).watch_timeout == 7
    with pytest.raises(InputError, match="--watch-timeout must be at least 1 second"):
        options_from_args(build_parser().parse_args(["run", "--watch-timeout", "0"]))


def test_no_client_side_request_limit_unless_asked() -> None:
    """API Priority and Fairness shares the API server out (controller-runtime's default since 0.21); a fixed
    rate set the pace of a large converge. --kube-api-qps still sets one."""
    from kaos_modelapi.cli import build_parser, options_from_args

    default = options_from_args(build_parser().parse_args(["run"]))
    assert default.kube_api_qps == 0
    asked = options_from_args(build_parser().parse_args(["run", "--kube-api-qps", "50", "--kube-api-burst", "100"]))
    assert (asked.kube_api_qps, asked.kube_api_burst) == (50, 100)


def test_many_workers_share_a_few_requests_in_flight() -> None:
    """A reconcile mostly waits on the API server: 16 of them at once fold more of their watch events into one
    reconcile, while 3 connections carry their requests (--kube-api-in-flight 0 lifts the cap)."""
    from kaos_modelapi.cli import InputError, build_parser, options_from_args

    default = options_from_args(build_parser().parse_args(["run"]))
    assert (default.workers, default.kube_api_in_flight) == (16, 3)
    assert options_from_args(build_parser().parse_args(["run", "--kube-api-in-flight", "0"])).kube_api_in_flight == 0
    with pytest.raises(InputError, match="--kube-api-in-flight must be 0"):
        options_from_args(build_parser().parse_args(["run", "--kube-api-in-flight", "-1"]))
