"""Start a kernel, push a DataFrame into it, compute there, pull the result back."""

import pandas as pd

import kernelproxy

sales = pd.DataFrame(
    {
        "region": ["north", "south", "north", "east", "south", "east"],
        "units": [12, 7, 3, 14, 9, 5],
        "price": [2.5, 3.0, 2.5, 4.0, 3.0, 4.0],
    }
)


def revenue_by_region(frame: pd.DataFrame) -> pd.Series:
    print(f"computing in the kernel over {len(frame)} rows")  # appears here, live
    return (frame["units"] * frame["price"]).groupby(frame["region"]).sum()


with kernelproxy.start() as kernel:  # a fresh local kernel, shut down at the end of the block
    kernel.push(sales=sales)  # the DataFrame now lives in the kernel as `sales`
    kernel["summary"] = kernel.call(revenue_by_region, kernel.eval("sales"))
    kernel.exec("best = summary.idxmax()")  # plain Python, run in the kernel's namespace
    summary, best = kernel.pull("summary", "best")
    print(summary.to_string())
    print(f"best region: {best} (kernel pid {kernel.info.pid}, {kernel.info.transport} transport)")
