"""Container images for the local cluster, built here because no container registry is reachable.

    python e2e/images.py build [REF...]   # build (unless cached) and print REF<TAB>archive for each
    python e2e/images.py list             # every ref, its cache key and whether its archive is cached
    python e2e/images.py prune            # drop layers no current image uses
    python e2e/images.py tidy             # remove what a build stopped midway left (make cluster-down runs it)
    python e2e/images.py clean            # remove the whole image cache and its storage

Each image is a docker-archive tarball whose RepoTags carry the exact ref a pod asks for, so
`ctr -n k8s.io images import ARCHIVE` names it right. Archives are cached under
~/.cache/kaos-modelapi/images/<key>/image.tar, where <key> is the sha256 of everything that went into the
image (recipe, copied files, the base's key, the CA bundle, ...): an image is rebuilt only when one of
those changes. Builds use buildah with runc and a private containers-storage under that cache (never the
machine's default one), never pull, and hold a lock so parallel sessions build each image once.

Standard library only: e2e/cluster.py and the Makefile run this before the venv exists.

Environment:
    KAOS_IMAGES_CACHE   archive cache and image storage (default: $XDG_CACHE_HOME or ~/.cache, /kaos-modelapi/images)
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "e2e" / "image-recipes"
# Bump when the build procedure itself changes in a way the hashed inputs do not show.
RECIPE_VERSION = "1"

BASE_REF = "docker.io/library/python:3.11-slim-trixie"
OPERATOR_REPOSITORY = "localhost/kaos-modelapi"
OPERATOR_TAG = "dev"
OPERATOR_REF = f"{OPERATOR_REPOSITORY}:{OPERATOR_TAG}"


# Tags other than `latest`, so a pod's default imagePullPolicy is IfNotPresent and never tries a pull.
STUB_BACKEND_REF = "localhost/kaos-stub-backend:dev"
CLIENT_REF = "localhost/kaos-client:dev"

# The rootfs standing in for python:3.11-slim: Debian 12 is the release whose python3 is 3.11.
DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The base image's config (podman import --change). UV_NATIVE_TLS: uv only trusts this machine's CA
# bundle (the way PyPI is reached here) when told to use the system store; `buildah bud --env` does not
# reach RUN steps, an ENV in the base does.
BASE_CONFIG = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV UV_NATIVE_TLS=1",
    'CMD ["python3"]',
)

# What this machine's runc needs: crun refuses the hybrid cgroup hierarchy, and the open-files hard limit
# is 20000, which a runtime must not try to raise.
RUNTIME_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
# Archives kept per ref: the current one and the one before (two work trees alternating keep both).
KEEP_PER_REF = 2
# Named stages of a recipe are tagged under this repository, so that their layers (buildah's cache of,
# e.g., the operator's dependency install) count as in use and survive the prune after each build.
STAGE_CACHE_REPOSITORY = "localhost/kaos-images-stage"

Log = Callable[[str], None]


def operator_chart_flags() -> list[str]:
    """Helm flags that make the chart run the operator image built here (its defaults name
    `kaos-modelapi:<appVersion>`, a registry image)."""
    return ["--set", f"image.repository={OPERATOR_REPOSITORY}", "--set", f"image.tag={OPERATOR_TAG}"]


def say(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("KAOS_IMAGES_CACHE") or xdg / "kaos-modelapi" / "images")


# --- the private containers-storage -------------------------------------------------------------------


def storage_flags() -> list[str]:
    """Global flags that point buildah and podman at this cache's own storage: builds and test containers
    never touch (or depend on) whatever else uses the machine's default storage."""
    root = cache_root()
    run = Path("/run/kaos-modelapi-images") / hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return ["--root", str(root / "storage"), "--runroot", str(run), "--storage-driver", "overlay"]


def _tool_env() -> dict[str, str]:
    # buildah keeps RUN --mount=type=cache directories under TMPDIR: keep them in this cache too.
    tmp = cache_root() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def podman_cmd(*args: str) -> list[str]:
    run = storage_flags()[3]
    return ["podman", *storage_flags(), "--tmpdir", f"{run}/libpod", "--cgroup-manager", "cgroupfs", *args]


def buildah_cmd(*args: str) -> list[str]:
    return ["buildah", *storage_flags(), *args]


def run(cmd: list[str], log: Log | None = None, stdin: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise with the tail of its output (the part that names the problem)."""
    if log:
        log("$ " + " ".join(cmd[:12]) + (" ..." if len(cmd) > 12 else ""))
    proc = subprocess.run(cmd, text=True, capture_output=True, env=_tool_env(), stdin=stdin)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return proc


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return run(podman_cmd(*args))


# --- what goes into each image ------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    ref: str
    # Files of the build context: name in the context -> file here. Their bytes are part of the key.
    context: dict[str, Path] = field(default_factory=dict)
    containerfile: str = "Containerfile"
    # Extra inputs that are not files of the context (the base's recipe, the mirror, ...).
    extra: tuple[str, ...] = ()
    derived: bool = True  # FROM the base (so the base's key is part of this one's)
    # Files another cached build step makes (name in the context -> a function that builds or finds it).
    # Their bytes are not hashed: that step's own cache key, which determines them, is in `extra`, so
    # listing the images never builds them.
    built: tuple[tuple[str, Callable[[], Path]], ...] = ()


def litellm_version() -> str:
    """LITELLM_VERSION from kaos_modelapi/litellm.py (read, not imported: no venv needed here)."""
    tree = ast.parse((REPO / "kaos_modelapi" / "litellm.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "LITELLM_VERSION":
            assert isinstance(node.value, ast.Constant)
            return str(node.value.value)
    raise RuntimeError("kaos_modelapi/litellm.py defines no LITELLM_VERSION")


def litellm_ref() -> str:
    """The operator's default LiteLLM image (kaos_modelapi.litellm.DEFAULT_IMAGE)."""
    return f"docker.io/litellm/litellm:v{litellm_version()}"


def ollama_build_module() -> ModuleType:
    """e2e/ollama_build.py (standard library only), loaded by path: this file also runs as a script."""
    name = "kaos_ollama_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "e2e" / "ollama_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ollama_image() -> Image:
    """The operator's default Ollama image (kaos_modelapi.ollama.DEFAULT_IMAGE): the binary that
    e2e/ollama_build.py builds from source, keyed by that build's cache key (the binary is the same bit
    for bit for a key)."""
    build_module = ollama_build_module()
    version = build_module.ollama_version()
    return Image(
        f"docker.io/ollama/ollama:{version}",
        context=_recipe("ollama"),
        extra=(f"ollama-build={build_module.cache_key(version)}",),
        built=(("ollama", build_module.build),),
    )


def debian_mirror() -> str:
    """The Debian mirror apt uses here for the base suite (from /etc/apt/sources.list*), so debootstrap
    fetches from the same place as `apt-get install` does."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        text = f.read_text() if f.is_file() else ""
        for uri in _uris_for_suite(text, DEBIAN_SUITE):
            return uri.rstrip("/")
    raise RuntimeError(f"no apt source for Debian {DEBIAN_SUITE} in /etc/apt/sources.list*")


def _uris_for_suite(text: str, suite: str) -> Iterator[str]:
    # One-line format: "deb [opts] URI SUITE COMPONENTS..."
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            yield words[1]
    # deb822 format: stanzas of "Key: value" separated by blank lines.
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
        if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
            yield from fields.get("URIs", "").split()


def operator_context() -> dict[str, Path]:
    """The Dockerfile and exactly the repository files its COPY instructions take from the context."""
    dockerfile = REPO / "Dockerfile"
    files = {"Dockerfile": dockerfile}
    for src in _dockerfile_copy_sources(dockerfile.read_text()):
        path = REPO / src
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if "__pycache__" not in p.parts and p.suffix != ".pyc":
                files[str(p.relative_to(REPO))] = p
    return files


def _dockerfile_copy_sources(text: str) -> list[str]:
    sources: list[str] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue  # from another stage, not from the context
        sources += [a.rstrip("/") for a in args if not a.startswith("--")][:-1]
    return [s for s in sources if s not in (".", "./")]


def _recipe(name: str) -> dict[str, Path]:
    return {p.name: p for p in sorted((RECIPES / name).iterdir()) if p.is_file()}


def images() -> dict[str, Image]:
    base_extra = (
        f"suite={DEBIAN_SUITE}",
        f"mirror={debian_mirror()}",
        "packages=" + ",".join(BASE_PACKAGES),
        *BASE_CONFIG,
        "ca-bundle-sha256=" + hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest(),
    )
    all_images = [
        Image(BASE_REF, extra=base_extra, derived=False),
        Image(OPERATOR_REF, context=operator_context(), containerfile="Dockerfile"),
        Image(
            litellm_ref(),
            context={**_recipe("litellm"), "litellm-requirements.lock": REPO / "e2e" / "litellm-requirements.lock"},
        ),
        Image(
            STUB_BACKEND_REF,
            context={**_recipe("stub-backend"), "stub_backend.py": REPO / "e2e" / "stub_backend.py"},
        ),
        Image(CLIENT_REF, context=_recipe("client")),
        ollama_image(),
    ]
    return {i.ref: i for i in all_images}


def image_key(image: Image, catalog: dict[str, Image] | None = None) -> str:
    """sha256 of everything that goes into the image, the base's key included for derived images."""
    catalog = catalog or images()
    h = hashlib.sha256()
    for part in (f"recipe-version={RECIPE_VERSION}", f"ref={image.ref}", *image.extra):
        h.update(part.encode() + b"\0")
    if image.derived:
        h.update(b"base=" + image_key(catalog[BASE_REF], catalog).encode() + b"\0")
    for name, path in sorted(image.context.items()):
        mode = "x" if os.access(path, os.X_OK) else "-"
        h.update(f"file={name}:{mode}:".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def archive_path(ref: str, catalog: dict[str, Image] | None = None) -> Path:
    catalog = catalog or images()
    return cache_root() / image_key(catalog[ref], catalog) / "image.tar"


# --- building -----------------------------------------------------------------------------------------


def build(ref: str, log: Log = say) -> Path:
    """The docker-archive of `ref`, built unless the cache holds one for the current inputs."""
    catalog = images()
    if ref not in catalog:
        raise KeyError(f"unknown image {ref!r}; known: {', '.join(catalog)}")
    target = archive_path(ref, catalog)
    if target.is_file():
        return target
    if catalog[ref].derived:
        build(BASE_REF, log)  # before taking the lock, which is not re-entrant
    for _, make in catalog[ref].built:
        make()  # e.g. the ollama binary (minutes when cold): not while holding the images lock
    with _lock():
        if target.is_file():  # another session built it while this one waited
            return target
        started, wall = time.monotonic(), int(time.time())
        remove_working_containers()  # of a build that was stopped midway
        try:
            _build_locked(catalog[ref], catalog, target, log)
        finally:
            remove_working_containers()  # (a Ctrl-C stops buildah midway too)
        log(f"built {ref} in {time.monotonic() - started:.0f} s: {target}")
        _forget_old_archives(ref, keep=target.parent)
        _prune_storage(before=wall)
    return target


def build_all(log: Log = say) -> dict[str, Path]:
    return {ref: build(ref, log) for ref in images()}


@contextmanager
def _lock(wait: bool = True) -> Iterator[bool]:
    """One build at a time across processes (also keeps two sessions from building the same image). Yields
    whether it is held: without `wait`, False at once while another process holds it."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_working_containers() -> None:
    """Remove buildah's working containers, each with its root filesystem mounted. A build that ends, even
    failing, removes its own; one stopped midway (Ctrl-C, a killed CI run) leaves them behind. Called while
    holding the lock, so no build is running and each one is a leftover; the containers podman runs (the
    tests') are not buildah's and stay."""
    if shutil.which("buildah") is None or not (cache_root() / "storage").is_dir():
        return
    run(buildah_cmd("rm", "--all"))


def tidy() -> bool:
    """What `make cluster-down` runs: the leftovers of a stopped build, unless a build is running now (then
    it removes them itself when it ends). True if tidied."""
    if not (cache_root() / "storage").is_dir():
        return True
    with _lock(wait=False) as held:
        if held:
            remove_working_containers()
        return held


def _build_locked(image: Image, catalog: dict[str, Image], target: Path, log: Log) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        if image.derived:
            _load(BASE_REF, archive_path(BASE_REF, catalog), log)
            _bud(image, work, log)
        else:
            _build_base(work, log)
        partial = work / "image.tar"
        run(buildah_cmd("push", "--quiet", image.ref, f"docker-archive:{partial}:{image.ref}"), log)
        image_id = podman("image", "inspect", "--format", "{{.Id}}", image.ref).stdout.strip()
        (target.parent / "ref").write_text(image.ref + "\n")
        (target.parent / "id").write_text(image_id + "\n")
        partial.rename(target)  # atomic: a reader sees a whole archive or none


def _bud(image: Image, work: Path, log: Log) -> None:
    ctx = work / "context"
    for name, src in [*image.context.items(), *((n, make()) for n, make in image.built)]:
        dest = ctx / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    containerfile = ctx / image.containerfile
    bud = ["bud", *RUNTIME_FLAGS, "--network", "host", "--pull-never", "--layers", "--force-rm"]
    bud += ["-f", str(containerfile)]
    for stage in _named_stages(containerfile.read_text()):
        run(buildah_cmd(*bud, "--target", stage, "-t", _stage_tag(image.ref, stage), str(ctx)), log)
    run(buildah_cmd(*bud, "-t", image.ref, str(ctx)), log)


def _named_stages(containerfile: str) -> list[str]:
    return re.findall(r"^\s*FROM\s+\S+\s+AS\s+(\S+)", containerfile, flags=re.M | re.I)


def _stage_tag(ref: str, stage: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", ref.rsplit(":", 1)[0].split("/", 1)[-1].lower()).strip("-")
    return f"{STAGE_CACHE_REPOSITORY}:{slug}-{stage.lower()}"


def _build_base(work: Path, log: Log) -> None:
    rootfs = work / "rootfs"
    debs = cache_root() / "debs"  # downloaded .debs survive a rebuild (e.g. a new CA bundle)
    debs.mkdir(parents=True, exist_ok=True)
    try:
        run(
            [
                "debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                f"--keyring={DEBIAN_KEYRING}", f"--cache-dir={debs}", DEBIAN_SUITE, str(rootfs), debian_mirror(),
            ],
            log,
        )
        _finish_rootfs(rootfs)
        changes = [a for c in BASE_CONFIG for a in ("--change", c)]
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "--one-file-system", "-c", "."], stdout=subprocess.PIPE
        )
        try:
            run(podman_cmd("import", "--quiet", *changes, "-", BASE_REF), log, stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the base rootfs failed")
    finally:
        _unmount_under(rootfs)  # debootstrap mounts /proc (and more) inside; never delete through a mount


def _finish_rootfs(rootfs: Path) -> None:
    """What makes the Debian rootfs stand in for python:3.11-slim: pip may install into the system
    Python, python3.11/python3/python in /usr/local/bin, this machine's CA bundle, no apt leftovers."""
    for managed in (rootfs / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        managed.unlink()
    bin_dir = rootfs / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python3.11", "python3", "python"):
        (bin_dir / name).unlink(missing_ok=True)
        (bin_dir / name).symlink_to("/usr/bin/python3.11")
    shutil.copyfile(CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / leftovers).glob("*"):
            if p.is_file():
                p.unlink()


def _unmount_under(path: Path) -> None:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for mount in sorted((m for m in mounts if m == prefix or m.startswith(prefix + "/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def ensure_loaded(ref: str, log: Log = say) -> None:
    """Make the private storage hold `ref` as cached (built or loaded from its archive): what buildah
    builds FROM and what podman runs."""
    _load(ref, build(ref, log), log)


def _load(ref: str, archive: Path, log: Log) -> None:
    want = (archive.parent / "id").read_text().strip()
    have = subprocess.run(
        podman_cmd("image", "inspect", "--format", "{{.Id}}", ref), text=True, capture_output=True, env=_tool_env()
    ).stdout.strip()
    if have != want:
        run(podman_cmd("load", "--quiet", "-i", str(archive)), log)


def _forget_old_archives(ref: str, keep: Path) -> None:
    """Drop all but the newest KEEP_PER_REF archives of `ref`: every source change makes a new one."""
    dirs = [d for d in cache_root().iterdir() if (d / "ref").is_file() and (d / "ref").read_text().strip() == ref]
    dirs.sort(key=lambda d: (d == keep, (d / "image.tar").stat().st_mtime if (d / "image.tar").exists() else 0))
    for old in dirs[:-KEEP_PER_REF]:
        shutil.rmtree(old, ignore_errors=True)


def _prune_storage(before: int | None = None) -> None:
    """Bound the private storage to the current images and their layers: drop every untagged image that
    no tagged one is built on (superseded builds; images and named stages are tagged), created before
    `before` (seconds since the epoch), so a build running alongside keeps its fresh layers."""
    until = str(before if before is not None else int(time.time()))
    subprocess.run(
        podman_cmd("image", "prune", "--force", "--filter", f"until={until}"),
        capture_output=True, env=_tool_env(), check=False,
    )


def clean() -> None:
    """Remove every cached archive and the private storage (its containers, images and run state)."""
    run(podman_cmd("system", "reset", "--force"))
    _unmount_under(cache_root())
    for child in cache_root().iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# --- CLI ----------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    command, refs = (argv[0], argv[1:]) if argv else ("list", [])
    if command == "build":
        for ref in refs or list(images()):
            print(f"{ref}\t{build(ref)}", flush=True)
        return 0
    if command == "list":
        catalog = images()
        for ref, image in catalog.items():
            key = image_key(image, catalog)
            state = "cached" if archive_path(ref, catalog).is_file() else "not built"
            print(f"{ref}\t{key[:16]}\t{state}")
        return 0
    if command == "prune":
        with _lock():
            _prune_storage()
        return 0
    if command == "tidy":
        print("working containers of stopped builds removed" if tidy() else "a build is running: left to it")
        return 0
    if command == "clean":
        with _lock():
            clean()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
