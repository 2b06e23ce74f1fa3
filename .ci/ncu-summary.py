#!/usr/bin/env python3
"""Summarise Nsight Compute kernel durations of `fmoec run` (the CSV of
`ncu --metrics gpu__time_duration.sum --csv --log-file F`, plain or .gz) for one micro-batch:
the kernels between two consecutive launches of the LM loss's forward (the fused `xent_fwd`
kernel, or libtorch's log-softmax before it: one forward tail, one backward and the next
forward), grouped by kernel family.

With --kinds: the forward (from the embedding's gather to the LM loss) and the backward (to the
next embedding gather) of the first micro-batch in the file, each by kind of work (matmuls,
attention, copies, LayerNorm, fmoec's kernels, ...), as BENCHMARKS.md's tables show them.

usage: ncu-summary.py NCU.csv[.gz] [--top N] [--kinds]
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


def kind(name):
    f = family(name)
    if "sdpa" in f or "dot_do_o" in f or "flash" in f:
        return "attention"
    if "nvjet" in f or "splitK" in f or "gemm" in f.lower() and "grouped" not in f:
        return "dense matmuls (cuBLAS)"
    if "cutlass" in f or "grouped_gemm" in f:
        return "grouped matmuls (experts)"
    if f.startswith("fp8_"):
        return "FP8 quantisation (fmoec)"
    if "layer_norm" in f or "GammaBeta" in f or f.startswith("norm_"):
        return "LayerNorm"
    if "direct_copy" in f or "bfloat16_copy" in f or "CatArray" in f:
        return "copies and dtype conversions"
    if f.startswith("xent_") or "SoftMax" in f:
        return "LM loss"
    if re.match(r"(bias_act|segment_sums|gather_rows|sum_rows|row_dots|plan_|swiglu_)", f):
        return "MoE kernels (fmoec)"
    if "reduce_kernel" in f or f.startswith("col_sums_"):
        return "reductions"
    return "other elementwise"


def kinds(rows):
    gathers = [i for i, (n, _) in enumerate(rows) if "vectorized_gather_kernel" in n]
    losses = [i for i, (n, _) in enumerate(rows) if n.startswith("xent_fwd")]
    starts = [g for g in gathers if losses and g < losses[0]]
    if not starts or len(gathers) < 2 or gathers[-1] < losses[0]:
        sys.exit("no embedding gather before and after the first LM loss: no whole micro-batch")
    # the gather is the embedding's lookup; the three kernels before it belong to its batch
    begin, loss = starts[-1] - 3, losses[0]
    end = next(g for g in gathers if g > loss) - 3
    parts = {"forward": rows[begin:loss + 1], "backward": rows[loss + 1:end]}
    time = {p: collections.Counter() for p in parts}
    count = collections.Counter()
    for p, window in parts.items():
        for n, t in window:
            time[p][kind(n)] += t
            count[kind(n)] += 1
    total = {p: sum(t for _, t in w) for p, w in parts.items()}
    print(f"one micro-batch: forward {len(parts['forward'])} kernels {total['forward'] / 1e3:.2f} ms, "
          f"backward {len(parts['backward'])} kernels {total['backward'] / 1e3:.2f} ms")
    print(f"{'forward ms':>11} {'backward ms':>12} {'kernels':>8}  kind")
    both = time["forward"] + time["backward"]
    for k, _ in both.most_common():
        print(f"{time['forward'][k] / 1e3:11.2f} {time['backward'][k] / 1e3:12.2f} {count[k]:8d}  {k}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if "--kinds" in sys.argv:
        return kinds(load(sys.argv[1]))
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
