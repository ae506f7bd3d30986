"""The production image, built from the top-level Dockerfile and run for real.

    python -m pytest -q tests/test_container.py     # 2 cores: ~1 min warm, ~4 min from nothing

No Docker engine here: buildah builds the Dockerfile through scripts/build_image.py (the script
users run) on a Debian bookworm base made locally with debootstrap, and `buildah run --isolation
chroot` runs the image's own CMD with a tiny trained model, quantized to INT8, mounted read-only
at /models (MODEL_PATH=/models/current). The container shares the host's network, so the tests
talk to it on 127.0.0.1. Checked: the config (non-root user, port, signal, healthcheck, labels),
what the image holds (the serving files only, CPU torch), /health, /ready and completions, the
uid of the server and engine processes, the HEALTHCHECK command itself, a drain on SIGTERM, and
that nothing is written outside /tmp.

Needs root, buildah, podman and debootstrap (`make system-deps`) and hadolint (requirements-dev.txt).
Two images stay behind on purpose, as the next run's build cache: localhost/bookworm-python:3.11
(about a minute to remake) and localhost/code-assistant:test (its pip layer: about two minutes).
Containers are removed. `buildah rmi --prune` frees older builds' layers (the pip layer too).
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import dev_tool, require_tool, tool_missing  # noqa: E402
from server_utils import ROOT, free_port  # noqa: E402

IMAGE = "localhost/code-assistant:test"
UID = 10001
# What serving imports, and nothing else (.dockerignore is an allow-list).
SERVING_FILES = {"serve_api.py", "serving.py", "engine.py", "engine_process.py", "model.py", "tokenizer.py",
                 "checkpoint.py", "quantization.py", "decode_kernels.py"}
BUILD_TIMEOUT_S = 900
READY_TIMEOUT_S = 120


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([dev_tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_passes_checkov() -> None:
    """checkov's Dockerfile checks; the one skip (CKV_DOCKER_7, a FROM that is a build arg) is
    justified inline in the Dockerfile."""
    out = subprocess.run([dev_tool("checkov"), "-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile",
                          "--skip-download", "--compact", "-o", "json"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.stdout.strip(), f"checkov printed nothing (exit {out.returncode}):\n{out.stderr[-2000:]}"
    report = json.loads(out.stdout)
    failed = [f"{c['check_id']} {c['check_name']}" for c in report["results"].get("failed_checks", [])]
    assert not failed, failed
    assert report["summary"]["passed"] > 100  # it really looked
    assert [c["check_id"] for c in report["results"].get("skipped_checks", [])] == ["CKV_DOCKER_7"]


# Local modules that serving code imports only off the serving path, so the image leaves them out.
NOT_SERVED = {"data": "quantization.perplexity reads val.bin at quantize time only"}


def local_imports(module: str) -> set[str]:
    """Names of this repo's top-level modules that `module` imports anywhere (lazy imports too)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if (ROOT / f"{n}.py").is_file()}


def test_image_gets_every_module_serving_imports() -> None:
    """What the Dockerfile copies (and .dockerignore lets into the build) is the import closure
    of serve_api.py and engine_process.py: a new local import cannot break only the image."""
    closure, todo = set(), ["serve_api", "engine_process"]
    while todo:
        module = todo.pop()
        if module in closure or module in NOT_SERVED:
            continue
        closure.add(module)
        todo += local_imports(module)
    assert {f"{m}.py" for m in closure} == SERVING_FILES
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # continued lines joined
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+?)\s\S+$", dockerfile, flags=re.M):
        copied |= set(sources.split())
    assert copied == SERVING_FILES | {"requirements-serve.txt"}
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert allowed == copied


def buildah(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, check=check)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image built by scripts/build_image.py with buildah, on the local base (made once)."""
    for tool in ("buildah", "podman", "debootstrap"):
        require_tool(tool, tool)
    if os.geteuid() != 0:
        tool_missing("the container test needs root (rootful buildah, debootstrap)")
    log = tmp_path_factory.mktemp("image") / "build.log"
    # --torch-index-url "": torch from pip's own settings, not download.pytorch.org (the
    # Dockerfile's CPU default). Machines like this one reach PyPI and nothing else, and their
    # pip settings hold the CPU wheel (a find-links dir the script mounts into the build);
    # test_image_contents checks that the CPU build is what landed.
    cmd = [sys.executable, str(ROOT / "scripts" / "build_image.py"), "--engine", "buildah", "--local-base",
           "--torch-index-url", "", "--tag", IMAGE, "--pip-python", sys.executable]
    start = time.monotonic()
    with log.open("w") as out:
        build = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = build.wait(BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(build.pid, signal.SIGKILL)  # buildah and debootstrap too, not just the script
            build.wait()
            pytest.fail(f"image build took over {BUILD_TIMEOUT_S} s:\n{tail(log)}")
    assert code == 0, f"image build failed:\n{tail(log)}"
    print(f"image built in {time.monotonic() - start:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """A buildah working container of the image, removed afterwards."""
    name = f"code-assistant-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--name", name, "--pull=never", image)
    try:
        yield name
    finally:
        buildah("umount", name, check=False)
        buildah("rm", name, check=False)


def container_config(name: str) -> dict:
    return json.loads(buildah("inspect", "--type", "container", name).stdout)["Docker"]["config"]


def run_in(container: str, *argv: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """A command in the container as the image's user, in its working dir."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return buildah("run", "--isolation", "chroot", *flags, container, "--", *argv, timeout=timeout, check=False)


@pytest.mark.slow
def test_image_config(container: str) -> None:
    cfg = container_config(container)
    env = dict(item.split("=", 1) for item in cfg["Env"])
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Cmd"] == ["python", "serve_api.py"] and not cfg.get("Entrypoint")
    assert cfg["WorkingDir"] == "/app"
    assert "8000/tcp" in cfg["ExposedPorts"]
    assert cfg["StopSignal"] == "SIGTERM"
    assert cfg["Healthcheck"]["Test"][0] == "CMD"
    for key, value in {"MODEL_PATH": "/models/current", "HOST": "0.0.0.0", "PORT": "8000", "PYTHONUNBUFFERED": "1",
                       "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        assert env.get(key) == value, key
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/")
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == "code-assistant"
    assert len(labels["org.opencontainers.image.revision"]) == 40  # the git commit


# Run inside the image as its user: what it holds and what that user may do.
PROBE = """
import importlib.util, json, os, torch
print(json.dumps({
    "training_only": [m for m in ("matplotlib", "datasketch", "tokenizers", "tqdm", "scipy")
                      if importlib.util.find_spec(m) is not None],
    "uid": os.getuid(), "gid": os.getgid(), "app": sorted(os.listdir("/app")),
    "cuda": torch.version.cuda, "torch": torch.__version__,
    "app_writable": os.access("/app", os.W_OK), "venv_writable": os.access("/opt/venv", os.W_OK),
    "tmp_writable": os.access("/tmp", os.W_OK),
    "leftovers": [p for p in ("/app/tests", "/app/.venv", "/app/data", "/app/bench", "/app/.git",
                              "/tmp/requirements-serve.txt", "/root/.cache/pip") if os.path.exists(p)],
}))
"""


@pytest.mark.slow
def test_image_contents(container: str) -> None:
    out = run_in(container, "python", "-c", PROBE)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert (probe["uid"], probe["gid"]) == (UID, UID)
    assert set(probe["app"]) - {"__pycache__"} == SERVING_FILES  # no tests/, .venv, data, out-*
    assert probe["leftovers"] == []
    assert probe["training_only"] == []  # requirements-serve.txt only: no plotting or training libraries
    assert probe["cuda"] is None and probe["torch"].startswith("2.13.0"), probe["torch"]  # the CPU build
    assert not probe["app_writable"] and not probe["venv_writable"] and probe["tmp_writable"]


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children_of(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


class Running:
    """The image's CMD under `buildah run`, on a free port, with the model dir mounted at /models."""

    def __init__(self, container: str, models: Path, log: Path) -> None:
        cfg = container_config(container)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = ["buildah", "run", "--isolation", "chroot", "-v", f"{models}:/models:ro", f"--env=PORT={self.port}",
                container, "--", *cfg["Cmd"]]
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids: list[int] = []

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the container exited with {self.proc.returncode}:\n{tail(self.log)}"
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.pids = descendants(self.proc.pid)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"not ready in {READY_TIMEOUT_S} s:\n{tail(self.log)}")

    def server_pid(self) -> int:
        """The python process of serve_api.py (buildah -> chroot runtime -> exec helper -> python)."""
        pids = [p for p in self.pids if cmdline(p)[:1] and cmdline(p)[0].endswith("/python")
                and cmdline(p)[1:] == ["serve_api.py"]]
        assert len(pids) == 1, [cmdline(p) for p in self.pids]
        return pids[0]

    def stop(self) -> None:
        """Kill what is left (buildah kills its child on SIGTERM) and check that no process outlives it."""
        if self.proc.poll() is None:
            self.pids = sorted(set(self.pids) | set(descendants(self.proc.pid)))
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while (alive := [p for p in self.pids if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"processes outlived the container: {[cmdline(p) for p in alive]}"


@pytest.fixture(scope="module")
def models_dir(tiny_ckpt_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What k8s mounts at /models: `current` is the tiny trained model quantized to INT8 (the
    CPU production path, so the image's quantization code is exercised too)."""
    models = tmp_path_factory.mktemp("models")
    # --force: the gate is quantize_model's business (tests/test_quantize.py), not the image's
    done = subprocess.run([sys.executable, str(ROOT / "quantize_model.py"), "--ckpt", str(tiny_ckpt_dir),
                           "--mode", "int8-dynamic", "--out", str(models / "current"), "--data-dir",
                           str(tiny_data_dir), "--force", "--no-bench", "--ppl-windows", "4", "--ppl-block", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # readable by uid 10001 inside (pytest makes its temp dirs 0700)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models


@pytest.fixture(scope="module")
def server(container: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = Running(container, models_dir, tmp_path_factory.mktemp("run") / "server.log")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_serves_health_ready_and_completions(server: Running) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    r = httpx.post(server.url + "/complete", json={"code": "def add(a, b):", "max_tokens": 8, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["completion"], str) and body["tokens"] > 0
    r = httpx.post(server.url + "/v1/completions", json={"model": "code-assistant", "prompt": "import os\n",
                                                         "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text


@pytest.mark.slow
def test_server_and_engine_run_as_uid_10001(server: Running) -> None:
    server_pid = server.server_pid()
    engine = [p for p in descendants(server_pid) if "/app/engine_process.py" in cmdline(p)]
    assert len(engine) == 1, "the engine child process is missing"
    for pid in (server_pid, engine[0]):
        status = Path(f"/proc/{pid}/status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if line.startswith(("Uid", "Gid"))}
        assert ids["Uid"] == [str(UID)] * 4 and ids["Gid"] == [str(UID)] * 4, (cmdline(pid), ids)


@pytest.mark.slow
def test_healthcheck_command_tells_up_from_down(server: Running, container: str) -> None:
    test = container_config(container)["Healthcheck"]["Test"]
    assert run_in(container, *test[1:], env={"PORT": str(server.port)}).returncode == 0
    closed = run_in(container, *test[1:], env={"PORT": str(free_port())})
    assert closed.returncode != 0


@pytest.mark.slow
def test_sigterm_drains_and_nothing_is_written_outside_tmp(server: Running, container: str) -> None:
    """Last in the module: it stops the server. SIGTERM goes to the server's own process (what
    docker stop / the kubelet send to PID 1); buildah would SIGKILL its child instead."""
    os.kill(server.server_pid(), signal.SIGTERM)
    assert server.proc.wait(60) == 0, tail(server.log)
    assert '"stopped"' in tail(server.log, 20000)
    # Read-only-rootfs friendly: the server (uid 10001) created nothing outside /tmp.
    root = Path(buildah("mount", container).stdout.strip())
    try:
        written = [str(p) for p in root.rglob("*")
                   if not p.is_symlink() and p.lstat().st_uid == UID and not p.relative_to(root).parts[0] == "tmp"]
    finally:
        buildah("umount", container, check=False)
    assert written == []
