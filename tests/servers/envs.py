"""Virtualenvs (and an npm prefix) for servers whose pins conflict with ours, built once and cached.

Enterprise Gateway 3.x pins jupyter_client 6 while kernelproxy needs 8, and
JupyterHub needs configurable-http-proxy from npm, so each server lives in its
own environment under CACHE_ROOT (default ``~/.cache/kernelproxy/test-servers``,
or ``$KERNELPROXY_TEST_SERVERS_CACHE``): a directory a fresh CI machine can
create. An environment's directory name carries a hash of what it holds (the
requirements, this Python's version), so changing a pin builds a new one beside
the old. A build is finished when its ``.complete`` marker is written (last);
builds run under a file lock, so an interrupted build never passes for a
finished one and two test processes never build the same thing twice.

Only the servers run in these environments: their kernels run *our* Python
(see ``kernelspec.py``), so pickles match on both sides.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# What each server environment holds. The smoke tests run against these; bump a pin here to test another release.
ENTERPRISE_GATEWAY = ("jupyter_enterprise_gateway>=3.2,<4",)
JUPYTERHUB = ("jupyterhub>=5,<7", "jupyter_server>=2")  # jupyter_server: the single-user server runs from this venv
CONFIGURABLE_HTTP_PROXY = ("configurable-http-proxy@^5",)  # npm packages

BUILD_TIMEOUT = 900  # seconds for one pip or npm install
TIMINGS_FILE = "build-times.json"  # in CACHE_ROOT: how long each environment took to build


class PrerequisiteMissing(RuntimeError):
    """Something a server environment needs is not on this machine (npm, say): the tests using it are skipped."""


def cache_root() -> Path:
    configured = os.environ.get("KERNELPROXY_TEST_SERVERS_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "kernelproxy" / "test-servers"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class BuiltEnv:
    path: Path
    seconds: float  # time this call spent building it; 0.0 when it came from the cache

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name


def python_venv(name: str, requirements: tuple[str, ...]) -> BuiltEnv:
    """A virtualenv holding ``requirements``, built on first use with uv (when installed) or venv + pip.

    uv builds one in about 10 s where pip takes 100-300 s on this 2-core machine
    (pip resolves and downloads one package at a time, then compiles every file).
    """
    key = _key("venv", name, requirements, sys.version)
    # The base interpreter, not our venv's: the server venv must not see our site-packages.
    base = getattr(sys, "_base_executable", sys.executable)
    uv = _uv()

    def build(target: Path) -> None:
        what = f"installing {' '.join(requirements)} into the {name} virtualenv"
        if uv is not None:
            _run([uv, "venv", "--quiet", "--python", base, str(target)], f"creating the {name} virtualenv")
            # No --compile-bytecode (35 s on 2 busy cores): the servers write .pyc files for the modules they
            # import at their first start (server_environment() lets them), about half of that.
            python = str(target / "bin" / "python")
            _run([uv, "pip", "install", "--quiet", "--python", python, *requirements], what)
        else:
            _run([base, "-m", "venv", str(target)], f"creating the {name} virtualenv")
            pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            _run([*pip, *requirements], what)

    return _cached(f"{name}-{key}", build)


def _uv() -> str | None:
    """uv's executable: the PyPI package's (a test dependency), else one on PATH; None: use pip."""
    if os.environ.get("KERNELPROXY_TEST_SERVERS_PIP"):  # force pip, e.g. to compare build times
        return None
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def npm_prefix(name: str, packages: tuple[str, ...]) -> BuiltEnv:
    """An npm prefix with ``packages`` installed (``node_modules/.bin`` holds their commands)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise PrerequisiteMissing(f"{name} needs Node.js and npm, which are not on PATH")
    key = _key("npm", name, packages, _node_version())

    def build(target: Path) -> None:
        target.mkdir(parents=True)
        command = [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund", "--loglevel=error", *packages]
        _run(command, f"npm install {' '.join(packages)}")

    built = _cached(f"{name}-{key}", build)
    return BuiltEnv(built.path / "node_modules", built.seconds)


def build_times() -> dict[str, float]:
    """Seconds each cached environment took to build when it was built (for the report at the end of a session)."""
    try:
        return json.loads((cache_root() / TIMINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------- internals


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _node_version() -> str:
    try:
        return subprocess.run(
            ["node", "--version"], check=False, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cached(dirname: str, build) -> BuiltEnv:
    """``root/dirname``, built by ``build(path)`` unless a finished build is there.

    Built in place (venv scripts hard-code their directory), finished when the
    ``.complete`` marker is written last: a directory without it is the remains
    of an interrupted build and is built again.
    """
    root = cache_root()
    target = root / dirname
    done = target / ".complete"
    if done.exists():
        return BuiltEnv(target, 0.0)
    with _locked(root / f"{dirname}.lock"):
        if done.exists():  # another process built it while we waited for the lock
            return BuiltEnv(target, 0.0)
        shutil.rmtree(target, ignore_errors=True)
        started = time.monotonic()
        try:
            build(target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        seconds = time.monotonic() - started
        done.write_text(f"{seconds:.1f}\n")
        _record_time(root, dirname, seconds)
        return BuiltEnv(target, seconds)


def _record_time(root: Path, dirname: str, seconds: float) -> None:
    path = root / TIMINGS_FILE
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        times = {}
    times[dirname] = round(seconds, 1)
    path.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            command, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took longer than {BUILD_TIMEOUT} s") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit code {result.returncode}):\n{output}")
