"""A data scientist's loop: keep a large DataFrame in a kernel, compute there, bring back small results."""

import time

import numpy as np
import pandas as pd

import kernelproxy

rows = 2_000_000
frame = pd.DataFrame(
    {
        "sensor": np.random.default_rng(0).integers(0, 50, rows),
        "value": np.random.default_rng(1).normal(size=rows),
        "time": pd.date_range("2026-01-01", periods=rows, freq="s"),
    }
)

with kernelproxy.start() as kernel:
    started = time.perf_counter()
    kernel.push(readings=frame)
    print(f"pushed {frame.memory_usage(deep=True).sum() / 1e6:.0f} MB in {time.perf_counter() - started:.2f} s")

    kernel.exec("import pandas as pd")
    hourly = kernel.eval("readings.set_index('time').groupby('sensor')['value'].resample('1h').mean()")
    print(f"hourly means: {len(hourly)} rows, back on the host as a {type(hourly).__name__}")

    @kernel.remote
    def outliers(threshold: float) -> int:
        import __main__  # the kernel's namespace, where `readings` was pushed

        readings = __main__.readings
        return int((readings["value"].abs() > threshold).sum())

    print("outliers above 3 sigma:", outliers(3.0))
