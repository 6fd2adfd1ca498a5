"""Kernels in other environments: a virtualenv with ipykernel but without kernelproxy.

The environments are built once and cached under ~/.cache/kernelproxy-tests/<python>-<cloudpickle>/
(override with KERNELPROXY_TEST_CACHE; see helpers.build_once). Building needs PyPI and takes about a minute.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
from helpers import TEST_CACHE, build_once, kernel_children, kill_new_kernels, pip_command, pip_target, run_build_step

import kernelproxy
from kernelproxy import EnvironmentMismatchError, KernelStartError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first test may build the environments

OLD_CLOUDPICKLE = "3.0.0"


@dataclass(frozen=True)
class Environments:
    venv_python: Path  # ipykernel only: no kernelproxy, no cloudpickle
    bare_python: Path  # no ipykernel at all
    cloudpickle_same: Path  # --target dir with the host's cloudpickle version
    cloudpickle_old: Path  # --target dir with cloudpickle OLD_CLOUDPICKLE


@pytest.fixture(scope="session")
def environments() -> Environments:
    key = f"py{platform.python_version()}-cloudpickle{cloudpickle.__version__}"
    root = TEST_CACHE / key
    root.mkdir(parents=True, exist_ok=True)

    def build_venv(target: Path) -> None:
        run_build_step([sys.executable, "-m", "venv", target], "python -m venv")
        run_build_step(pip_command(target / "bin" / "python", "install", "ipykernel"), "pip install ipykernel")

    def build_bare(target: Path) -> None:
        run_build_step([sys.executable, "-m", "venv", "--without-pip", target], "python -m venv --without-pip")

    venv = build_once(root / "venv-ipykernel", build_venv)
    bare = build_once(root / "venv-bare", build_bare)
    same = pip_target("cloudpickle", cloudpickle.__version__)
    old = pip_target("cloudpickle", OLD_CLOUDPICKLE)
    envs = Environments(venv / "bin" / "python", bare / "bin" / "python", same, old)

    # The environments must really be what the tests assume, or the tests prove nothing.
    probe_code = (
        "import ipykernel, importlib.util as u; "
        "print(u.find_spec('cloudpickle') is None, u.find_spec('kernelproxy') is None)"
    )
    probe = subprocess.run(
        [str(envs.venv_python), "-c", probe_code],
        check=False,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert probe.stdout.split() == ["True", "True"], (probe.stdout, probe.stderr)
    return envs


@pytest.fixture
def no_new_kernels():
    """Fail if the test leaves a kernel process behind (and clean it up)."""
    before = {proc.pid for proc in kernel_children()}
    yield
    deadline = time.monotonic() + 5
    while {p.pid for p in kernel_children()} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = kill_new_kernels(before)
    assert not leaked, f"kernel processes left behind: {leaked}"


def find_spec_of(name: str):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cloudpickle_location() -> str:
    import cloudpickle as kernel_cloudpickle

    return kernel_cloudpickle.__file__


# ---------------------------------------------------------------------- a compatible venv


def test_venv_kernel_with_cloudpickle_on_pythonpath(environments, tmp_path, transport, no_new_kernels):
    with kernelproxy.start(
        python=str(environments.venv_python),
        env={"PYTHONPATH": str(environments.cloudpickle_same)},
        cwd=tmp_path,
        transport=transport,
    ) as k:
        assert k.info.executable == str(environments.venv_python)
        assert k.info.cloudpickle == cloudpickle.__version__
        assert k.info.pid != os.getpid()
        assert k.call(lambda: sys.prefix) == str(environments.venv_python.parent.parent)
        assert k.call(cloudpickle_location).startswith(str(environments.cloudpickle_same))

        # kernelproxy needs no installation in the kernel
        assert k.call(find_spec_of, "kernelproxy") is False
        assert k.eval("'kernelproxy' in __import__('sys').modules") is False

        # calls, push, pull, exec/eval, errors, chunked transfers
        assert k.call(lambda a, b=1: a * b, 6, b=7) == 42
        offset = 100
        assert k.call(lambda x: x + offset, 1) == 101
        k.push(venv_value={"a": [1, 2, 3]}, other=2)
        assert k.pull("venv_value", "other") == ({"a": [1, 2, 3]}, 2)
        k.exec("venv_total = sum(venv_value['a']) * other")
        assert k["venv_total"] == 12
        with pytest.raises(ZeroDivisionError) as info:
            k.call(lambda: 1 / 0)
        assert "1 / 0" in info.value.__cause__.traceback
        blob = os.urandom(5 * 1024 * 1024)
        assert k.call(lambda b: b[::-1], blob) == blob[::-1]
        assert k.call(find_spec_of, "pybase64") is False  # the agent runs on its stdlib fallback here


def test_venv_kernel_cannot_unpickle_host_only_package(environments, tmp_path, no_new_kernels):
    numpy = pytest.importorskip("numpy")
    with kernelproxy.start(
        python=str(environments.venv_python), env={"PYTHONPATH": str(environments.cloudpickle_same)}, cwd=tmp_path
    ) as k:
        assert k.call(find_spec_of, "numpy") is False
        with pytest.raises(kernelproxy.SerializationError, match="numpy"):
            k.push(array=numpy.arange(3))
        assert "array" not in k
        assert k.call(lambda: "still usable") == "still usable"


# ---------------------------------------------------------------------- incompatible environments


def test_venv_without_cloudpickle(environments, tmp_path, no_new_kernels):
    started = time.monotonic()
    with pytest.raises(EnvironmentMismatchError) as info:
        kernelproxy.start(python=str(environments.venv_python), env={"PYTHONPATH": ""}, cwd=tmp_path)
    message = str(info.value)
    assert "cloudpickle" in message
    assert "install" in message.lower()
    assert str(environments.venv_python) in message
    assert cloudpickle.__version__ in message  # says which version to install
    assert time.monotonic() - started < 60


def test_venv_with_other_cloudpickle_version(environments, tmp_path, no_new_kernels):
    if cloudpickle.__version__.split(".")[:2] == OLD_CLOUDPICKLE.split(".")[:2]:
        pytest.skip(f"the host's cloudpickle {cloudpickle.__version__} is compatible with {OLD_CLOUDPICKLE}")
    with pytest.raises(EnvironmentMismatchError) as info:
        kernelproxy.start(
            python=str(environments.venv_python), env={"PYTHONPATH": str(environments.cloudpickle_old)}, cwd=tmp_path
        )
    message = str(info.value)
    assert OLD_CLOUDPICKLE in message
    assert cloudpickle.__version__ in message
    assert str(environments.venv_python) in message


def test_python_without_ipykernel(environments, tmp_path, no_new_kernels):
    started = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        kernelproxy.start(python=str(environments.bare_python), cwd=tmp_path)
    assert time.monotonic() - started < 20, "a kernel that exits at once must not wait for the startup timeout"
    message = str(info.value)
    assert f"{environments.bare_python} cannot import ipykernel (ModuleNotFoundError" in message
    assert f"{environments.bare_python} -m pip install ipykernel cloudpickle" in message  # what to do


async def _start_async_mismatch(environments, tmp_path):
    return await kernelproxy.start_async(python=str(environments.venv_python), env={"PYTHONPATH": ""}, cwd=tmp_path)


def test_start_async_without_cloudpickle(environments, tmp_path, no_new_kernels):
    with pytest.raises(EnvironmentMismatchError, match="cloudpickle"):
        asyncio.run(_start_async_mismatch(environments, tmp_path))


# ---------------------------------------------------------------------- a library whose version differs

OTHER_NUMPY = "1.26.4"  # numpy 1.x: its pickles name numpy.core, numpy 2's name numpy._core


def make_array():
    import numpy

    return numpy.arange(3)


def test_numpy_version_difference_is_named_with_both_versions(environments, tmp_path, no_new_kernels):
    """Not "No module named numpy._core" with advice to install it: numpy is there, in another version."""
    numpy = pytest.importorskip("numpy")
    if numpy.__version__.split(".")[0] == OTHER_NUMPY.split(".")[0]:
        pytest.skip(f"the host's numpy {numpy.__version__} has the kernel's major version")
    old_numpy = pip_target("numpy", OTHER_NUMPY)
    with kernelproxy.start(
        python=str(environments.venv_python),
        env={"PYTHONPATH": f"{environments.cloudpickle_same}{os.pathsep}{old_numpy}"},
        cwd=tmp_path,
    ) as k:
        assert k.eval("__import__('numpy').__version__") == OTHER_NUMPY
        with pytest.raises(kernelproxy.SerializationError) as info:
            k.push(array=numpy.arange(3))
        message = str(info.value)
        assert "numpy._core" in message  # what the kernel could not find...
        assert f"versions differ: {numpy.__version__} here, {OTHER_NUMPY} in the kernel" in message  # ...and why
        assert f"pip install numpy=={numpy.__version__}" in message
        assert "register_pickle_by_value" not in message
        assert "array" not in k
        # the other way round, numpy 2 reads numpy 1's pickles (through its numpy.core shim, which warns)
        with pytest.warns(DeprecationWarning, match="numpy.core"):
            assert k.call(make_array).tolist() == [0, 1, 2]
