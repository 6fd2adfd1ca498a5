"""Offload CPU-heavy work to a kernel while the host stays responsive."""

import time

import kernelproxy


def count_primes(limit: int) -> int:
    """Deliberately slow, pure-Python work (it holds the GIL of whatever process runs it)."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for number in range(2, int(limit**0.5) + 1):
        if sieve[number]:
            sieve[number * number :: number] = bytearray(len(range(number * number, limit + 1, number)))
    return sum(1 for flag in sieve if flag)


with kernelproxy.start() as kernel:
    future = kernel.submit(count_primes, 20_000_000)  # a concurrent.futures.Future
    ticks = 0
    while not future.done():  # the host keeps working meanwhile
        ticks += 1
        time.sleep(0.1)
    print(f"{future.result()} primes below 20 million; the host ticked {ticks} times while waiting")

    try:
        kernel.options(timeout=1).call(count_primes, 10**9)
    except kernelproxy.CallTimeout as exc:
        print("timed out as asked:", exc)
    print("kernel still usable:", kernel.call(count_primes, 100))
