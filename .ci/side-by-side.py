#!/usr/bin/env python3
"""Prints `fmoec bench moe --json` rows beside `.ci/device-peers.py --json` rows of the same
card as one Markdown table: forward + backward ms / TFLOP/s / peak MiB per implementation, and
each peer's time over fmoec's (above 1: fmoec is faster).

usage: side-by-side.py BENCH_JSON PEERS_JSON
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    bench = json.load(open(sys.argv[1]))
    peers = json.load(open(sys.argv[2]))
    table = {}
    for r in bench["rows"]:
        key = (r["shape"]["name"], r["shape"]["act"], r["routing"])
        table.setdefault(key, {})[r["implementation"]] = (
            r["forward_backward"]["median_ms"],
            r["forward_backward_tflops"],
            r["peak_memory_bytes"] / 2**20,
        )
    for r in peers["rows"]:
        key = (r["shape"], r["act"], r["routing"])
        table.setdefault(key, {})[r["impl"]] = (r["fwd_bwd_ms"], r["fwd_bwd_tflops"], r["peak_mib"])
    impls = ["fmoec", "ops", "torch-grouped", "fastmoe"]
    print(f"fmoec: {bench['device']}, dense {bench['dense_ceiling_tflops']:.0f} TFLOP/s; "
          f"peers: {peers['device']}, dense {peers['dense_tflops']:.0f} TFLOP/s")
    print("| shape | act | routing | " + " | ".join(impls) + " | "
          + " | ".join(f"{i} / fmoec" for i in impls[1:]) + " |")
    print("|---" * (3 + 2 * len(impls) - 1) + "|")

    def cell(v):
        return f"{v[0]:.2f} ms / {v[1]:.0f} TF / {v[2]:,.0f} MiB" if v else "–"

    for (shape, act, routing), row in table.items():
        ours = row.get("fmoec")
        ratios = [f"{row[i][0] / ours[0]:.2f}x" if ours and i in row else "–" for i in impls[1:]]
        print(f"| {shape} | {act} | {routing} | "
              + " | ".join(cell(row.get(i)) for i in impls) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
