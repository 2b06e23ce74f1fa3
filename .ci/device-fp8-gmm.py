# FP8 grouped matmuls on this GPU (BENCHMARKS.md, 2026-12-06; run on the device: `python3 .ci/device-fp8-gmm.py`): forward (2d-3d), input gradient (2d-3d), weight gradient
# (2d-2d, groups padded to 16 along the contraction), fast accumulation on and off, against
# bf16 torch._grouped_mm of the same shapes. CUDA events, medians of 20 after 5 warm-ups.
import torch, statistics
torch.manual_seed(0)
dev = "cuda"; bf = torch.bfloat16; f8 = torch.float8_e4m3fn
def timeit(f, it=20, warm=5):
    for _ in range(warm): f()
    ts = []
    for _ in range(it):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
for name, T, d, h, E, k in [("S1", 16384, 4096, 14336, 8, 2), ("S3", 16384, 2048, 768, 128, 8), ("F0", 4096, 1024, 4096, 64, 2)]:
    N = T * k; per = N // E
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
    x = torch.randn(N, d, device=dev, dtype=bf); w = torch.randn(E, d, h, device=dev, dtype=bf) * 0.02
    g = torch.randn(N, h, device=dev, dtype=bf)
    fl = 2 * N * d * h
    xq = x.to(f8); wt = w.transpose(1, 2).contiguous().to(f8)  # [E, h, d]
    wq = w.to(f8)  # [E, d, h]
    gq = g.to(f8)
    sx = torch.ones(N, device=dev); sw = torch.ones(E, h, device=dev); swd = torch.ones(E, d, device=dev)
    xT = x.t().contiguous().to(f8); gT = g.t().contiguous().to(f8)  # [d, N], [h, N]
    sa = torch.ones(E * d, device=dev); sb = torch.ones(E * h, device=dev)
    r = {}
    r["bf16 fwd"] = timeit(lambda: torch._grouped_mm(x, w, offs=offs))
    r["bf16 dgrad"] = timeit(lambda: torch._grouped_mm(g, w.transpose(1, 2), offs=offs))
    r["bf16 wgrad"] = timeit(lambda: torch._grouped_mm(x.t(), g, offs=offs))
    for fast in (True, False):
        r[f"fp8 fwd fast={fast}"] = timeit(lambda: torch._scaled_grouped_mm(xq, wt.transpose(1, 2), sx, sw, offs=offs, out_dtype=bf, use_fast_accum=fast))
        r[f"fp8 dgrad fast={fast}"] = timeit(lambda: torch._scaled_grouped_mm(gq, wq.transpose(1, 2), sx, swd, offs=offs, out_dtype=bf, use_fast_accum=fast))
        r[f"fp8 wgrad fast={fast}"] = timeit(lambda: torch._scaled_grouped_mm(xT, gT.t(), sa, sb, offs=offs, out_dtype=bf, use_fast_accum=fast))
    r["bf16 x.t() contiguous (a transpose)"] = timeit(lambda: x.t().contiguous())
    r["bf16 abs amax rows of g"] = timeit(lambda: g.abs().amax(1))
    print(name, "  ".join(f"{k}: {v:.3f} ms ({fl / v / 1e9:.0f} TF)" for k, v in r.items()), flush=True)
