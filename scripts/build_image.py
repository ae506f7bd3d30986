"""Build the server image (the top-level Dockerfile) with docker, or with buildah where no Docker engine runs.

    python scripts/build_image.py                                  # code-assistant:dev, CPU torch
    python scripts/build_image.py --tag code-assistant:gpu --torch-index-url "" \
        --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev"             # torch's CUDA build from PyPI
    python scripts/build_image.py --engine buildah --local-base    # no registry: debootstrap a base first

pip's settings on this machine (index-url, extra-index-url, find-links and cert, as
`pip config list` shows them, PIP_* variables included) go into the build as build args, so a
private index or a proxy's CA works inside the build as it does outside. With buildah, local
paths among them (a file:// index, a wheel directory, the CA bundle) are bind-mounted read-only
for the build only; `docker build` cannot mount them, so there they are left out with a warning.
Nothing of this lands in the image: the runtime stage copies only the venv and the code.
Where download.pytorch.org (the Dockerfile's CPU default) is out of reach but pip's own settings
hold the CPU wheel (a find-links dir, a mirror), pass --torch-index-url "" as
tests/test_container.py does.

--local-base makes `localhost/bookworm-python:3.11` (Debian bookworm minbase + python3) with
debootstrap, once, for machines that reach package mirrors but no image registry (root needed).
Only the standard library: this runs before any venv exists.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BASE = "localhost/bookworm-python:3.11"
PIP_KEYS = {"index-url": "PIP_INDEX_URL", "extra-index-url": "PIP_EXTRA_INDEX_URL",
            "find-links": "PIP_FIND_LINKS", "cert": "PIP_CERT"}
CERT_IN_BUILD = "/run/pip-ca.crt"  # where the CA bundle is mounted during a buildah build


def log(msg: str) -> None:
    print(f"build_image: {msg}", file=sys.stderr, flush=True)


def pip_settings(python: str) -> dict[str, str]:
    """pip's index settings from `pip config list` (files and PIP_* variables), by pip's precedence:
    the environment over an [install] section over [global]."""
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        log(f"could not read pip's settings with {python} ({type(e).__name__}); building without them")
        return {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or key not in PIP_KEYS or section not in rank:
            continue
        try:
            value = str(ast.literal_eval(raw))  # pip prints repr() of the value
        except (ValueError, SyntaxError):
            continue
        if key not in found or rank[section] >= found[key][0]:
            found[key] = (rank[section], " ".join(value.split()))
    return {PIP_KEYS[k]: v for k, (_, v) in found.items() if v}


def local_dir(location: str, is_index: bool) -> str | None:
    """The host directory a build needs mounted for a pip location, or None for a remote one.
    A file:// index `<root>/simple` links its files relative to `<root>`, so `<root>` is mounted."""
    if location.startswith(("http://", "https://")):
        return None
    path = Path(urlparse(location).path if location.startswith("file:") else location)
    if not path.exists():
        return None
    if is_index and path.name == "simple":
        path = path.parent
    return str(path)


def build_args_and_mounts(settings: dict[str, str], engine: str) -> tuple[list[str], list[str]]:
    """--build-arg and (buildah only) -v options that give the build pip's settings."""
    args: list[str] = []
    mounts: dict[str, str] = {}
    for var, value in settings.items():
        if var == "PIP_CERT":
            if not Path(value).is_file():
                continue
            if engine == "docker":
                log(f"{var}: `docker build` cannot mount {value}; add the CA to the base image if pip needs it")
                continue
            mounts[value] = CERT_IN_BUILD
            args.append(f"{var}={CERT_IN_BUILD}")
            continue
        kept = []
        for location in value.split():
            directory = local_dir(location, is_index=var != "PIP_FIND_LINKS")
            if directory is None:
                if location.startswith(("http://", "https://")):
                    kept.append(location)
                continue
            if engine == "docker":
                log(f"{var}: `docker build` cannot mount the local {location}; left out")
                continue
            mounts[directory] = directory
            kept.append(location)
        if kept:
            args.append(f"{var}={' '.join(kept)}")
    volumes = [f"{src}:{dst}:ro" for src, dst in mounts.items()]
    return args, volumes


def image_exists(tag: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", tag], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode == 0


def apt_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), if any."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in (".list", ".sources", ""):
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                urls = words[1:]
            elif words[:1] == ["deb"]:
                urls = [w for w in words[1:] if "://" in w][:1]
            else:
                continue
            for url in urls:
                if not url.rstrip("/").endswith(("-security", "/debian-security")):
                    return url
    return None


def make_local_base(tag: str = LOCAL_BASE) -> None:
    """Debian bookworm minbase + python3 as an image (about a minute), unless `tag` exists."""
    if image_exists(tag):
        log(f"base image {tag} exists")
        return
    for tool in ("debootstrap", "podman"):
        if shutil.which(tool) is None:
            sys.exit(f"build_image: {tool} not found (apt-get install -y buildah podman debootstrap)")
    mirror = apt_mirror()
    with tempfile.TemporaryDirectory(prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
               "bookworm", str(rootfs)] + ([mirror] if mirror else [])
        log(f"debootstrap bookworm into {rootfs} (mirror {mirror or 'debootstrap default'})")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        # what the official slim images leave out too: downloaded .debs and apt lists
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", tag], stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
        tar.stdout.close()
        if tar.wait() != 0:
            sys.exit("build_image: tar of the rootfs failed")
    log(f"base image {tag} made")


def pick_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    if shutil.which("docker") and subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, check=False).returncode == 0:
        return "docker"
    if shutil.which("buildah"):
        return "buildah"
    sys.exit("build_image: neither a running Docker engine nor buildah found")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"


def build_command(engine: str, tag: str, base_image: str | None, torch_index_url: str | None,
                  pip_python: str, version: str, extra_args: list[str]) -> list[str]:
    args, volumes = build_args_and_mounts(pip_settings(pip_python), engine)
    args += extra_args
    if base_image:
        args.append(f"BASE_IMAGE={base_image}")
    if torch_index_url is not None:
        args.append(f"TORCH_INDEX_URL={torch_index_url}")
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    revision = git_revision()
    args += [f"VERSION={version}", f"REVISION={revision}", f"CREATED={created}"]
    # Also as --label, applied at commit: buildah 1.28 reuses a cached LABEL step whose ARG changed.
    labels = [f"org.opencontainers.image.revision={revision}", f"org.opencontainers.image.created={created}"]
    if engine == "docker":
        cmd = ["docker", "build"]
    else:
        # chroot isolation needs no OCI runtime (crun cannot set rlimits in some sandboxes);
        # docker format, because the OCI image format has no HEALTHCHECK.
        cmd = ["buildah", "bud", "--isolation", os.environ.get("BUILDAH_ISOLATION", "chroot"), "--layers",
               "--format", "docker"]
        for volume in volumes:
            cmd += ["-v", volume]
    for arg in args:
        cmd += ["--build-arg", arg]
    for label in labels:
        cmd += ["--label", label]
    return cmd + ["-f", str(ROOT / "Dockerfile"), "-t", tag, str(ROOT)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="code-assistant:dev")
    p.add_argument("--engine", choices=("auto", "docker", "buildah"), default="auto")
    p.add_argument("--base-image", default=None,
                   help="BASE_IMAGE build arg (the Dockerfile's default: python:3.11-slim)")
    p.add_argument("--local-base", action="store_true",
                   help=f"make {LOCAL_BASE} with debootstrap if missing and build on it (buildah)")
    p.add_argument("--torch-index-url", default=None,
                   help="TORCH_INDEX_URL build arg; '' takes torch from pip's other indexes (PyPI: the CUDA build)")
    p.add_argument("--pip-python", default=sys.executable, help="the Python whose pip settings are passed on")
    p.add_argument("--version", default="dev", help="org.opencontainers.image.version")
    p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                   help='more build args, e.g. EXTRA_APT_PACKAGES="gcc libc6-dev" for a GPU image')
    p.add_argument("--dry-run", action="store_true", help="print the build command only")
    a = p.parse_args()

    engine = pick_engine(a.engine)
    base = a.base_image
    if a.local_base:
        if engine != "buildah":
            sys.exit("build_image: --local-base builds with buildah (--engine buildah)")
        if not a.dry_run:
            make_local_base(LOCAL_BASE)
        base = base or LOCAL_BASE
    for arg in a.build_arg:
        if "=" not in arg:
            p.error(f"--build-arg {arg!r}: expected KEY=VALUE")
    cmd = build_command(engine, a.tag, base, a.torch_index_url, a.pip_python, a.version, a.build_arg)
    print(shlex.join(cmd), flush=True)
    if not a.dry_run:
        sys.exit(subprocess.run(cmd, check=False).returncode)


if __name__ == "__main__":
    main()
