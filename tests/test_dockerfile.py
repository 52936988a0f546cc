"""The Dockerfile, checked without a container engine.

No image can be built on this machine, so this replays the builder stage outside Docker: its COPY steps
copy the same files (filtered like .dockerignore) into a temp dir, its RUN steps run as written (minus
BuildKit's `--mount` flags) with its ENV, WORKDIR and $VIRTUAL_ENV mapped into that temp dir. The venv
it produces must run `kaos-modelapi --version` and `crd` without writing a byte, hold only locked
runtime packages, and the final stage must be non-root and start `kaos-modelapi run`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCAL_UV = Path(sys.prefix) / "bin" / "uv"
DEV_ONLY = {"pytest", "pytest-asyncio", "mypy", "ruff", "openai", "types-pyyaml"}


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.steps if kw == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for arg in self.args("ENV"):
            for pair in shlex.split(arg):
                key, _, value = pair.partition("=")
                env[key] = value
        return env


def logical_lines(text: str) -> Iterator[str]:
    """Instructions as Docker reads them: comments dropped, backslash continuations joined."""
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        yield current + line
        current = ""
    assert not current, "Dockerfile ends inside a continued line"


def parse(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, arg = line.partition(" ")
        keyword, arg = keyword.upper(), arg.strip()
        if keyword == "ARG" and not stages:
            name, _, default = arg.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = arg.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].steps.append((keyword, arg))
    return stages


def strip_run_flags(arg: str) -> str:
    """RUN --mount=... --network=... cmd -> cmd (BuildKit flags only change caching/sandboxing)."""
    while arg.startswith("--"):
        _, _, arg = arg.partition(" ")
        arg = arg.lstrip()
    return arg


STAGES = parse(DOCKERFILE.read_text(encoding="utf-8"))
BUILDER, FINAL = STAGES[0], STAGES[-1]


def dockerignore_allows(path: str) -> bool:
    """The .dockerignore here is a whitelist (`*` then `!name`): each COPY source must be whitelisted."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should exclude everything, then list what the image needs"
    return f"!{path.rstrip('/')}" in rules


def copy_context(sources: list[str], workdir: Path, dest: str) -> None:
    """COPY semantics: a directory's contents land in dest; files land in dest/ (or at dest, if one file)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    into_dir = len(sources) > 1 or dest.endswith("/")
    target = workdir / dest
    for src in sources:
        assert dockerignore_allows(src), f"COPY {src}: excluded by .dockerignore"
        origin = ROOT / src
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
        elif into_dir:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def uv_version(uv: Path) -> str:
    return subprocess.run([uv, "--version"], check=True, capture_output=True, text=True).stdout.split()[1]


def provide_uv(version: str, tmp: Path, bindir: Path) -> None:
    """`pip install uv==X` in the image: here, the project's uv when it is that version, else that one."""
    if LOCAL_UV.exists() and uv_version(LOCAL_UV) == version:
        (bindir / "uv").symlink_to(LOCAL_UV)
        return
    venv = tmp / "uv-venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", f"uv=={version}"], check=True)
    (bindir / "uv").symlink_to(venv / "bin" / "uv")


@dataclass
class Built:
    venv: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if shutil.which("python3.11") is None:
        pytest.fail("python3.11 (the image's interpreter) must be on PATH")
    tmp = tmp_path_factory.mktemp("image")
    root = tmp / "root"  # stands for the builder's filesystem root
    bindir = tmp / "bin"
    bindir.mkdir()
    # The image's PATH, less this project's venv (the image has no dev venv).
    outside = [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)]
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join([str(bindir), *outside])
    for key, value in BUILDER.env().items():
        env[key] = str(root) + value if key == "VIRTUAL_ENV" else value
    assert "VIRTUAL_ENV" in env, "the builder should name its venv in ENV VIRTUAL_ENV"
    workdir = root
    for keyword, arg in BUILDER.steps:
        if keyword == "WORKDIR":
            workdir = root / arg.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = shlex.split(arg)
            assert not any(s.startswith("--") for s in sources), f"COPY flags not replayable: {arg}"
            assert not dest.startswith("/"), f"COPY to an absolute path: {arg}"
            copy_context(sources, workdir, dest)
        elif keyword == "RUN":
            command = strip_run_flags(arg)
            pinned = re.fullmatch(r"pip install (?:--\S+ )*uv==(\S+)", command)
            if pinned:
                provide_uv(pinned.group(1), tmp, bindir)
                continue
            absolute = [w for w in shlex.split(command) if w.startswith("/")]
            assert not absolute, f"RUN names absolute paths {absolute}: use $VIRTUAL_ENV or WORKDIR-relative ones"
            result = subprocess.run(["sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
        elif keyword not in {"ARG", "LABEL", "ENV"}:  # ENV: applied above
            pytest.fail(f"builder instruction {keyword} is not replayed by this test")
    runtime_env = {**env, **{k: v for k, v in FINAL.env().items() if k != "PATH" and k != "VIRTUAL_ENV"}}
    runtime_env["PATH"] = os.pathsep.join([env["VIRTUAL_ENV"] + "/bin", *outside])
    return Built(Path(env["VIRTUAL_ENV"]), runtime_env)


def snapshot(tree: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in tree.rglob("*") if not p.is_symlink()}


def test_the_image_venv_runs_the_cli_and_writes_nothing(built: Built) -> None:
    before = snapshot(built.venv)
    version = subprocess.run(
        ["kaos-modelapi", "--version"], env=built.env, capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("kaos-modelapi ")
    crd = subprocess.run(["kaos-modelapi", "crd"], env=built.env, capture_output=True, text=True, check=True)
    from kaos_modelapi.crd import crd_yaml

    assert crd.stdout == crd_yaml()
    run_help = subprocess.run(
        ["kaos-modelapi", "run", "--help"], env=built.env, capture_output=True, text=True, check=True
    )
    assert "--leader-elect" in run_help.stdout
    # `run` imports the whole operator (aiohttp, kubernetes-asyncio, prometheus-client, ...): a module that
    # only the dev extra brings would fail here, not at the first start of the pod.
    subprocess.run(
        [built.venv / "bin" / "python", "-c", "import kaos_modelapi.operator"], env=built.env, check=True
    )
    assert snapshot(built.venv) == before, "running the CLI wrote into the venv (readOnlyRootFilesystem)"


def test_the_image_venv_holds_only_locked_runtime_packages(built: Built) -> None:
    freeze = subprocess.run(
        [str(LOCAL_UV if LOCAL_UV.exists() else "uv"), "pip", "freeze", "--python", str(built.venv / "bin/python")],
        capture_output=True, text=True, check=True,
    ).stdout
    lock = (ROOT / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.MULTILINE))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    installed = dict(line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    installed = {name.lower().replace("_", "-"): version for name, version in installed.items()}
    assert re.search(r"^kaos-modelapi @ file://", freeze, re.MULTILINE), "the operator itself is not installed"
    for name, version in installed.items():
        assert pins.get(name) == version, f"{name}=={version} is not the locked version ({pins.get(name)})"
    assert not DEV_ONLY & installed.keys(), "dev tools leaked into the image"
    for runtime in ("kubernetes-asyncio", "orjson", "uvloop", "pydantic", "pyyaml", "prometheus-client", "structlog"):
        assert runtime in installed


def test_bytecode_is_compiled_at_build_time(built: Built) -> None:
    site = next(built.venv.glob("lib/python3.*/site-packages"))
    assert list((site / "kaos_modelapi" / "__pycache__").glob("cli.*.pyc")), "UV_COMPILE_BYTECODE not in effect"


def test_final_stage_is_non_root_and_runs_the_operator() -> None:
    users = FINAL.args("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root UID (runAsNonRoot checks it)"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert json.loads(FINAL.args("ENTRYPOINT")[-1]) == ["kaos-modelapi", "run"]
    assert not FINAL.args("CMD")


def test_final_stage_is_read_only_friendly_and_copies_only_the_venv() -> None:
    env = FINAL.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    venv = BUILDER.env()["VIRTUAL_ENV"]
    assert env["PATH"].startswith(f"{venv}/bin:")
    assert FINAL.args("COPY") == [f"--from={BUILDER.name} {venv} {venv}"]
    assert not FINAL.args("RUN"), "the final stage adds nothing but the venv"
    # The venv's interpreter is a symlink into the base image: both stages must use the same one.
    assert FINAL.base == BUILDER.base


def test_uv_is_pinned() -> None:
    runs = [strip_run_flags(a) for a in BUILDER.args("RUN")]
    assert any(re.fullmatch(r"pip install (?:--\S+ )*uv==\d+\.\d+\.\d+", r) for r in runs)
