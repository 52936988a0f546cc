#!/usr/bin/env python3
"""Build the `ollama` binary of the release the operator's default image pins, CPU only, from what the
package registries serve; cache it; print its path.

    python e2e/ollama_build.py        # build unless cached; print the binary's path

Sources, all pinned by hash below:
- Ollama itself: the Go module github.com/ollama/ollama at the release tag, from the Go module proxy
  (`go mod download`), checked against its go.sum hash (h1:). Module zips leave out every `vendor/`
  folder, which drops exactly four headers that llama.cpp vendors (llama/llama.cpp/vendor/):
  nlohmann/json.hpp and json_fwd.hpp (nlohmann/json 3.12.0), stb/stb_image.h (v2.30) and
  miniaudio/miniaudio.h (a v0.11.24 development snapshot).
- Those four headers: from the llama-cpp-python source distribution on PyPI, which ships llama.cpp's
  vendor/ folder. Release 0.3.17's json.hpp, json_fwd.hpp and stb_image.h are byte for byte the files
  in Ollama's repository at the tag; its miniaudio.h is the v0.11.25 release, the nearest published
  version (no registry has the snapshot; the difference is bug fixes and additions that Ollama does not
  call: llama.cpp uses miniaudio only to decode audio files for multimodal input).
- The compilers: Debian's gcc/g++ (cgo; no CUDA, ROCm or Vulkan).

The binary is cached outside the work tree, keyed by this file and the pinned release:
$XDG_CACHE_HOME or ~/.cache, /kaos-modelapi/ollama/<sha256>/ollama (build.log beside it). Concurrent
builds wait for one another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

if __package__ in (None, ""):  # run as a script: python e2e/ollama_build.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e.buildcache import build_once, exclusive

ROOT = Path(__file__).resolve().parent.parent
VERSION_FILE = ROOT / "kaos_modelapi" / "ollama.py"
MODULE = "github.com/ollama/ollama"
VENDOR = "llama/llama.cpp/vendor"

@dataclass(frozen=True)
class Pins:
    """Per Ollama release: the module's go.sum hash, and where the vendored headers come from and their
    hashes. A new release needs a new entry (`go mod download -json` prints the Sum; compare the headers
    with the ones in the repository at the tag)."""

    module_sum: str
    headers_from: str  # a PyPI requirement whose sdist carries llama.cpp's vendor/ folder
    headers_sdist_sha256: str
    headers_prefix: str  # that folder's path inside the sdist
    headers: dict[str, str]  # path under vendor/ -> sha256


PINS = {
    "0.12.6": Pins(
        module_sum="h1:bJwDFeFFswOIXkfmSTQReV6Mj3yzPkP2LPb/OjSHQ2M=",
        headers_from="llama-cpp-python==0.3.17",
        headers_sdist_sha256="39c31948d234ff351bf638f1e468d893dd29282dd4d47716a39c6a0a1e63b123",
        headers_prefix="llama_cpp_python-0.3.17/vendor/llama.cpp/vendor",
        headers={
            # identical to Ollama's repository at v0.12.6
            "nlohmann/json.hpp": "aaf127c04cb31c406e5b04a63f1ae89369fccde6d8fa7cdda1ed4f32dfc5de63",
            "nlohmann/json_fwd.hpp": "fb6aa70cbece087f37ab4685c182b287c53be54f785f981b9db9d30d2d028b37",
            "stb/stb_image.h": "594c2fe35d49488b4382dbfaec8f98366defca819d916ac95becf3e75f4200b3",
            # miniaudio v0.11.25 (the repository has a v0.11.24 snapshot, sha256 05b75871...e68f38)
            "miniaudio/miniaudio.h": "ac7af4de748b7e26b777f37e01cee313a308a7296a3eb080e2906b320cc55c89",
        },
    ),
}


class BuildError(Exception):
    pass


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ollama_version() -> str:
    match = re.search(r'^OLLAMA_VERSION: Final = "([^"]+)"', VERSION_FILE.read_text(), re.M)
    if match is None:
        raise BuildError(f"no OLLAMA_VERSION in {VERSION_FILE}")
    return match.group(1)


def cache_root() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("KAOS_OLLAMA_CACHE_DIR") or xdg / "kaos-modelapi" / "ollama")


def cache_key(version: str) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(b"\0" + version.encode())
    return h.hexdigest()


def binary_path(version: str | None = None) -> Path:
    version = version or ollama_version()
    return cache_root() / cache_key(version) / "ollama"


def build() -> Path:
    """The binary for the pinned release: from the cache, or built now."""
    version = ollama_version()
    target = binary_path(version)
    if target.exists():
        return target
    if version not in PINS:
        raise BuildError(f"e2e/ollama_build.py has no pins for Ollama {version}: add an entry to PINS")
    for tool in ("go", "gcc", "g++"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is not on PATH: Ollama builds with Go and Debian's gcc/g++ "
                             "(apt-get install build-essential)")
    return build_once(target, lambda tmp: _build_into(version, PINS[version], tmp), say)


def _module_source(version: str, pins: Pins, work: Path) -> Path:
    """The module's tree from the Go module proxy, checked against its pinned hash, as a writable copy."""
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    result = subprocess.run(["go", "mod", "download", "-json", f"{MODULE}@v{version}"], cwd=work, env=env,
                            capture_output=True, text=True)
    info = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "Dir" not in info:
        raise BuildError(f"go mod download {MODULE}@v{version} failed: {info.get('Error') or result.stderr}")
    if info.get("Sum") != pins.module_sum:
        raise BuildError(f"{MODULE}@v{version} has hash {info.get('Sum')}, pinned {pins.module_sum}")
    src = work / "ollama"
    shutil.copytree(info["Dir"], src)
    for path in [src, *src.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the module cache is read-only
    return src


def _vendor_headers(pins: Pins, src: Path, work: Path, out: IO[str]) -> None:
    """The headers the module zip dropped, from the pinned sdist, each checked against its pinned hash."""
    req = work / "headers.txt"
    req.write_text(f"{pins.headers_from} --hash=sha256:{pins.headers_sdist_sha256}\n")
    dl = work / "sdist"
    # --no-binary: the source distribution is what carries llama.cpp's vendor/ folder (pip prepares its
    # metadata, which installs its build requirements into a throw-away environment; nothing is built).
    package = pins.headers_from.split("==")[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", package,
                    "--require-hashes", "-r", str(req), "-d", str(dl)],
                   check=True, stdout=out, stderr=subprocess.STDOUT)
    (sdist,) = dl.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        for rel, sha in pins.headers.items():
            member = tar.extractfile(f"{pins.headers_prefix}/{rel}")
            data = member.read() if member else b""
            if hashlib.sha256(data).hexdigest() != sha:
                raise BuildError(f"{rel} from {pins.headers_from} is missing or does not have the pinned hash")
            target = src / VENDOR / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def _build_into(version: str, pins: Pins, tmp_bin: Path) -> None:
    build_log = tmp_bin.parent / "build.log"
    say(f"building ollama {version} (CPU only) into {tmp_bin.parent}; a cold build takes several minutes ...")
    began = time.monotonic()
    # The sources go to the same folder every time: cgo's compiled C/C++ objects are keyed by it in the Go
    # build cache, so a new cache key (an edit to this file) relinks instead of compiling llama.cpp again.
    src_root = cache_root() / "build" / f"v{version}"
    with exclusive(cache_root() / "build.lock"), open(build_log, "w") as out:
        shutil.rmtree(src_root, ignore_errors=True)
        src_root.mkdir(parents=True)
        try:
            src = _module_source(version, pins, src_root)
            _vendor_headers(pins, src, src_root, out)
            jobs = os.environ.get("KAOS_BUILD_JOBS", "2")
            argv = ["go", "build", f"-p={jobs}", "-trimpath", "-buildvcs=false",
                    "-ldflags", f"-X github.com/ollama/ollama/version.Version={version}", "-o", str(tmp_bin), "."]
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            env = {**os.environ, "CGO_ENABLED": "1", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
            subprocess.run(argv, cwd=src, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError as e:
            raise BuildError(f"building ollama failed ({' '.join(map(str, e.cmd[:3]))} exited {e.returncode}); "
                             f"full output in {build_log}") from e
        finally:
            shutil.rmtree(src_root, ignore_errors=True)
    say(f"built {tmp_bin.parent} in {time.monotonic() - began:.0f} s")


def main() -> int:
    try:
        print(build())
    except BuildError as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
