"""A user's typed script, checked by tests/test_typing.py with mypy --strict (never run).

Each line whose comment starts with "E:" must be reported, and no other line.
"""

from __future__ import annotations

import kernelproxy


def add(a: int, b: int = 0) -> int:
    return a + b


def describe(frame: dict[str, int]) -> str:
    return str(frame)


async def use_async(ak: kernelproxy.AsyncKernel) -> None:
    total: int = await ak.call(add, 1, 2)
    await ak.call(add, "x")  # E: async call, wrong type
    work = ak.remote(add)
    await work(1, b=2)
    print(total)


def main(k: kernelproxy.Kernel, pool: kernelproxy.KernelPool) -> None:
    total: int = k.call(add, 1, 2)
    k.call(add, 1, b=2)
    k.call(add, "one", 2)  # E: wrong type
    k.call(add, 1, 2, 3)  # E: too many
    k.call(add, 1, c=2)  # E: unknown keyword
    future = k.submit(add, 1)
    value: int = future.result()
    k.submit(add, "x")  # E: submit wrong type
    ref = k.call_ref(dict, a=1)
    k.call(describe, ref)  # a RemoteRef stands for the remote object
    k.call_ref(add, "x")  # E: call_ref wrong type

    @k.remote
    def work(x: int) -> str:
        return str(x)

    text: str = work(3)
    work("x")  # E: remote keeps the signature
    pool.submit(add, 1, 2).result()
    pool.submit(add, "x")  # E: pool submit wrong type
    squares: list[int] = list(pool.map(add, [1, 2], [3, 4]))
    pool.map(add, ["a"])  # E: pool map wrong item type
    bad: list[str] = list(pool.map(add, [1]))  # E: result type
    print(total, value, text, squares, bad)
