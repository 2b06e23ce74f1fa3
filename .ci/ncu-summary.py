#!/usr/bin/env python3
"""Summarise Nsight Compute kernel durations of `fmoec run` (the CSV of
`ncu --metrics gpu__time_duration.sum --csv --log-file F`, plain or .gz) for one micro-batch:
the kernels between two consecutive launches of the LM loss's forward (the fused `xent_fwd`
kernel, or libtorch's log-softmax before it: one forward tail, one backward and the next
forward), grouped by kernel family.

usage: ncu-summary.py NCU.csv[.gz] [--top N]
"""
import collections
import csv
import gzip
import re
import sys


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [l for l in f if l.startswith('"')]
    rows = []
    for r in csv.DictReader(lines):
        if r["Metric Name"] != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3}
        rows.append((r["Kernel Name"], v * scale.get(r["Metric Unit"], 1.0)))
    return rows


def family(name):
    n = name.replace("void ", "")
    n = re.sub(r"at::native::|native::|<unnamed>::|\(anonymous namespace\)::|at_cuda_detail::", "", n)
    head = re.match(r"([^<(]+)", n).group(1)
    if any(w in head for w in ("elementwise", "reduce_kernel")):
        f = sorted(set(re.findall(r"(\w+(?:Functor|_kernel_cuda|_kernel_impl|Ops))", n)))
        head += " [" + ",".join(f[:3])[:70] + "]"
    return head[:110]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 25
    rows = load(sys.argv[1])
    marks = [i for i, (n, _) in enumerate(rows) if n.startswith("xent_fwd")]
    marks = marks or [i for i, (n, _) in enumerate(rows) if "SoftMaxForward" in n]
    if len(marks) < 2:
        sys.exit(f"{len(rows)} kernels and {len(marks)} LM-loss launches: no whole micro-batch")
    window = rows[marks[0]:marks[1]]
    total = sum(t for _, t in window)
    mm = sum(t for n, t in window if re.search(r"nvjet|cutlass|gemm|sdpa|flash", n))
    small = [t for _, t in window if t < 8.0]
    print(f"one micro-batch: {len(window)} kernels, {total / 1e3:.2f} ms summed "
          f"({mm / 1e3:.2f} ms matmuls and attention); {len(small)} kernels under 8 us "
          f"({sum(small) / 1e3:.2f} ms)")
    count, time = collections.Counter(), collections.Counter()
    for n, t in window:
        k = family(n)
        count[k] += 1
        time[k] += t
    print(f"{'ms':>8} {'share':>6} {'calls':>6}  kernel family")
    for k, t in time.most_common(top):
        print(f"{t / 1e3:8.2f} {100 * t / total:5.1f}% {count[k]:6d}  {k}")


if __name__ == "__main__":
    main()
