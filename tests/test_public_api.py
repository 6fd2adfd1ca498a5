"""The shape of the public API, and the agent's constraints (stdlib only, Python 3.8 syntax)."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import subprocess
import sys
import types
from importlib import resources

import pytest

import kernelproxy

# Dunder methods of the mapping protocol and the context managers, which differ by design.
SYNC_ONLY = {"aio"}
POOL_EXECUTOR_ONLY: set = set()  # Executor's members KernelPool inherits are all shared
POOL_ASYNC_ONLY = {"start"}  # an AsyncKernelPool starts on `async with` or start(); a KernelPool when made


def agent_source() -> str:
    return resources.files("kernelproxy.agent").joinpath("_agent.py").read_text(encoding="utf-8")


def public_members(cls: type) -> set:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_all_is_sorted():
    assert kernelproxy.__all__ == sorted(kernelproxy.__all__)
    assert len(set(kernelproxy.__all__)) == len(kernelproxy.__all__)


def test_all_matches_public_names():
    """Every public name is in __all__ and vice versa; fails on accidental exports (e.g. a stray import)."""
    public = set()
    for name, value in vars(kernelproxy).items():
        if name.startswith("_"):
            continue
        if isinstance(value, types.ModuleType) and value.__name__.startswith("kernelproxy."):
            continue  # subpackages appear as attributes once imported; they are not exports
        public.add(name)
    public.add("__version__")
    assert set(kernelproxy.__all__) == public


def test_all_names_exist():
    for name in kernelproxy.__all__:
        assert hasattr(kernelproxy, name), name


def test_version_is_a_string():
    assert isinstance(kernelproxy.__version__, str)
    assert kernelproxy.__version__.count(".") >= 2


def test_exceptions_are_exported_from_their_module():
    from kernelproxy import _exceptions

    exported = {name for name in kernelproxy.__all__ if isinstance(getattr(kernelproxy, name), type)}
    errors = {name for name in exported if issubclass(getattr(kernelproxy, name), BaseException)}
    assert errors == set(_exceptions.__all__)


def test_kernel_and_async_kernel_have_the_same_methods():
    sync = public_members(kernelproxy.Kernel) - SYNC_ONLY
    async_ = public_members(kernelproxy.AsyncKernel)
    assert sync == async_


def test_kernel_and_async_kernel_signatures_match():
    """Same parameters (names, kinds, defaults) for every shared method."""
    for name in public_members(kernelproxy.AsyncKernel):
        sync_member = inspect.getattr_static(kernelproxy.Kernel, name)
        async_member = inspect.getattr_static(kernelproxy.AsyncKernel, name)
        assert type(sync_member) is type(async_member), name  # property vs method
        if isinstance(sync_member, property):
            continue
        sync_sig = inspect.signature(sync_member)
        async_sig = inspect.signature(async_member)
        assert [(p.name, p.kind, p.default) for p in sync_sig.parameters.values()] == [
            (p.name, p.kind, p.default) for p in async_sig.parameters.values()
        ], name


def test_async_kernel_methods_are_coroutines_except_documented():
    not_coroutines = {"submit", "remote", "options"}
    for name in public_members(kernelproxy.AsyncKernel):
        member = inspect.getattr_static(kernelproxy.AsyncKernel, name)
        if isinstance(member, property):
            continue
        assert inspect.iscoroutinefunction(member) == (name not in not_coroutines), name


def test_mapping_dunders_on_kernel():
    for dunder in ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__enter__", "__exit__"):
        assert callable(getattr(kernelproxy.Kernel, dunder)), dunder
    for dunder in ("__aenter__", "__aexit__"):
        assert callable(getattr(kernelproxy.AsyncKernel, dunder)), dunder


def parameters(member) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()]


@pytest.mark.parametrize("name", ["start", "connect", "connect_server"])
def test_api_functions_match_their_async_twins(name):
    assert parameters(getattr(kernelproxy, name)) == parameters(getattr(kernelproxy, f"{name}_async"))


def test_kernel_pool_and_async_kernel_pool_have_the_same_api():
    sync_members = public_members(kernelproxy.KernelPool) - POOL_EXECUTOR_ONLY
    assert sync_members == public_members(kernelproxy.AsyncKernelPool) - POOL_ASYNC_ONLY
    for name in sync_members:
        sync_member = inspect.getattr_static(kernelproxy.KernelPool, name)
        async_member = inspect.getattr_static(kernelproxy.AsyncKernelPool, name)
        assert type(sync_member) is type(async_member), name
        if not isinstance(sync_member, property):
            assert parameters(getattr(kernelproxy.KernelPool, name)) == parameters(
                getattr(kernelproxy.AsyncKernelPool, name)
            ), name
    assert parameters(kernelproxy.KernelPool.__init__) == parameters(kernelproxy.AsyncKernelPool.__init__)


def test_remote_ref_and_async_remote_ref_have_the_same_api():
    assert public_members(kernelproxy.RemoteRef) == public_members(kernelproxy.AsyncRemoteRef)
    for name in public_members(kernelproxy.RemoteRef):
        assert parameters(getattr(kernelproxy.RemoteRef, name)) == parameters(
            getattr(kernelproxy.AsyncRemoteRef, name)
        ), name


# ---------------------------------------------------------------------- the agent


def test_agent_parses_as_python_3_8():
    ast.parse(agent_source(), filename="_agent.py", feature_version=(3, 8))


def test_agent_compiles():
    compile(agent_source(), "<kernelproxy-agent>", "exec")


def _module_level_imports(tree: ast.Module):
    """(required, optional) top-level module names the agent imports at module level.

    Optional ones are inside a ``try:`` that catches ImportError (accelerators with a stdlib fallback).
    """
    required, optional = set(), set()

    def names(node):
        if isinstance(node, ast.Import):
            return {alias.name.split(".")[0] for alias in node.names}
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the agent is not a package module: no relative imports"
            return {node.module.split(".")[0]}
        return set()

    def catches_import_error(handler: ast.ExceptHandler) -> bool:
        caught = handler.type
        if caught is None:
            return True
        elements = caught.elts if isinstance(caught, ast.Tuple) else [caught]
        broad = ("ImportError", "ModuleNotFoundError", "Exception")
        return any(isinstance(e, ast.Name) and e.id in broad for e in elements)

    for node in tree.body:  # module level only: cloudpickle is imported lazily inside a function
        if isinstance(node, ast.Try) and any(catches_import_error(h) for h in node.handlers):
            for sub in node.body:
                for inner in ast.walk(sub):
                    optional |= names(inner)
            for part in [*node.handlers, *node.orelse, *node.finalbody]:
                for inner in ast.walk(part):
                    required |= names(inner)
        elif isinstance(node, (ast.If, ast.Try)):
            for inner in ast.walk(node):
                required |= names(inner)
        else:
            required |= names(node)
    return required, optional


def test_agent_module_level_imports_are_stdlib():
    required, optional = _module_level_imports(ast.parse(agent_source()))
    assert required, "found no imports at all: the test is not looking at the right source"
    non_stdlib = {name for name in required if name not in sys.stdlib_module_names}
    assert not non_stdlib, f"the agent needs non-stdlib modules at module level: {non_stdlib}"
    assert not {"kernelproxy", "cloudpickle"} & (required | optional)


ISOLATED_AGENT = r"""
import json, sys, types
blocked = json.loads(sys.argv[1])
for name in blocked:
    sys.modules[name] = None  # import name -> ImportError
source = sys.stdin.read()
before = set(sys.modules)
module = types.ModuleType("_kernelproxy_agent_v1")
exec(compile(source, "<kernelproxy-agent>", "exec"), module.__dict__)
sys.modules[module.__name__] = module
new = sorted(set(sys.modules) - before)
payload = bytes(range(256)) * 1000
print(json.dumps({
    "kernelproxy": "kernelproxy" in sys.modules,
    "cloudpickle": "cloudpickle" in sys.modules,
    "third_party": sorted(n for n in new if n.split(".")[0] not in sys.stdlib_module_names and n != module.__name__),
    "protocol": module.PROTOCOL,
    "base64_round_trip": bytes(module._decode(module._encode(payload))) == payload,
    "base64_is_standard": module._encode(bytes([0xFB, 0xFF])) == "+/8=",
}))
"""


def run_agent_isolated(blocked=()) -> dict:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_AGENT, json.dumps(sorted(blocked))],
        check=False,
        input=agent_source(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_agent_executes_in_isolated_interpreter_without_importing_host_packages():
    _, optional = _module_level_imports(ast.parse(agent_source()))
    result = run_agent_isolated()
    assert result["protocol"] == 1
    assert result["kernelproxy"] is False
    assert result["cloudpickle"] is False
    unexpected = {name.split(".")[0] for name in result["third_party"]} - optional
    assert not unexpected, f"the agent imported third-party modules at module level: {unexpected}"
    assert result["base64_round_trip"] and result["base64_is_standard"]


def test_agent_works_with_only_the_stdlib():
    """With every optional accelerator unavailable the agent still loads and encodes correctly."""
    _, optional = _module_level_imports(ast.parse(agent_source()))
    result = run_agent_isolated(blocked=optional)
    assert result["protocol"] == 1
    assert result["third_party"] == []
    assert result["base64_round_trip"] and result["base64_is_standard"]


def test_agent_hello_without_cloudpickle_reports_it():
    """hello() answers in plain JSON even when cloudpickle cannot be imported (the handshake relies on it)."""
    code = r"""
import json, sys, types
sys.modules["cloudpickle"] = None  # import cloudpickle -> ImportError
source = sys.stdin.read()
module = types.ModuleType("_kernelproxy_agent_v1")
exec(compile(source, "<kernelproxy-agent>", "exec"), module.__dict__)
bundle = module.hello()
payload = bundle._repr_mimebundle_()[module.MIME]
print(json.dumps(payload))
"""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        check=False,
        input=agent_source(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["cloudpickle"] is None
    assert "cloudpickle" in payload["cloudpickle_error"]
    assert payload["protocol"] == 1
    assert payload["python"] == ".".join(map(str, sys.version_info[:3]))


def test_agent_source_is_what_kernelproxy_ships():
    from kernelproxy.agent import _agent

    assert agent_source() == inspect.getsource(_agent)


# The sha256 of the agent's source at each REVISION. A change to the agent without a new REVISION would leave
# long-lived kernels running the old code for new hosts: raise REVISION in _agent.py and add its hash here.
AGENT_REVISIONS = {
    2: "54f0523d2a76b1b65c3bc74a8e944486b4f62c4eda038ffb9adc4a93a081ad63",
    3: "f45540912ea558d8b6a28e60da70b944546f3351fdbc2519da8a4afead0ee7bb",
    4: "ccc59a6ad0cee5cfb5cbd5c3aea8f8a7a4efe10afc50f501c62ae3bc41edb72a",
    5: "91b70ccd600d8c861e2e2476745f9b42236077688528cbf039ad861dd1d486b1",
    6: "2d6364290078f6f296d5391114856d1af3bc585c44b72fc7f1a77657dfc8a118",
    7: "5390852a6b4462e7eb459cacaf697298f273c575414eb55fce9e6f1edae8b5c0",
    8: "90827f09b6d62424b7a7649e1984fccc661f8e60222b41f6695a16f5b2d077b3",
    9: "2178e69f26171059975a995a0d9db4a168c26676e7604661bc6403dee018b68a",
    10: "f69f9424a811ca4897faa5f0e39d989000f04caa3bd1f615c8ad3324f8708e11",
    11: "cd5e5bdf8ee1036b40c6955173a6ea132e1d6c1ab3d721b217fd60c98edaff20",
    12: "0dd46094fef96b9daa7bc540be56accddfeedf5624548b0d887e23436a5daf67",
    13: "d0f07eb1b078b989145af05f71a350cd7d9e82735b25dec5da01bcf6df3680f2",
    14: "1759142e21b5798720d875a7586089e8e3324988764c42fe41b1fb7167e15bc5",
}


def test_agent_changes_come_with_a_new_revision():
    from kernelproxy.agent import _agent

    digest = hashlib.sha256(agent_source().encode("utf-8")).hexdigest()
    assert _agent.REVISION == max(AGENT_REVISIONS), "record the new revision's hash in AGENT_REVISIONS"
    assert AGENT_REVISIONS[_agent.REVISION] == digest, (
        f"the agent's source changed (sha256 {digest}) but its REVISION ({_agent.REVISION}) did not: kernels "
        "that have the older source installed would keep it. Raise REVISION in _agent.py and record "
        "the new hash in AGENT_REVISIONS."
    )


def test_every_public_name_is_in_the_api_reference():
    """Each name in __all__ has a ``::: kernelproxy.NAME`` block on a page of docs/reference/ (mkdocs renders it)."""
    import pathlib
    import re

    import pytest

    reference = pathlib.Path(__file__).resolve().parent.parent / "docs" / "reference"
    if not reference.is_dir():
        pytest.skip("no docs/reference/ next to the tests (an installed copy)")
    pages = "\n".join(page.read_text(encoding="utf-8") for page in sorted(reference.glob("*.md")))
    documented = set(re.findall(r"^::: kernelproxy\.(\w+)\s*$", pages, flags=re.MULTILINE))
    missing = sorted(set(kernelproxy.__all__) - {"__version__"} - documented)
    assert not missing, f"add '::: kernelproxy.NAME' to a page of docs/reference/ for: {missing}"
