# Grouped-matmul experiment for BENCHMARKS.md (session 5): at S1 and F0 (issue 6's shapes, bf16,
# equal groups), does one `torch._grouped_mm` over the concatenated [w1|w3] beat two (SwiGLU's
# forward, input gradient and weight gradient), and how does cuBLAS `bmm` on the same equal
# groups compare with `_grouped_mm` (forward, dX, dW)? CUDA events, 5 warm-up and 30 timed
# iterations, medians. Run on the device: `python3 .ci/device-gmm.py`.
import torch, statistics
torch.manual_seed(0)
dev = "cuda"; bf = torch.bfloat16
def timeit(f, it=30, warm=5):
    for _ in range(warm): f()
    ts = []
    for _ in range(it):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
def gmm(a, w, offs): return torch._grouped_mm(a, w, offs=offs)
for name, T, d, h, E, k in [("S1", 16384, 4096, 14336, 8, 2), ("F0", 4096, 1024, 4096, 64, 2)]:
    N = T * k; per = N // E
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
    x = torch.randn(N, d, device=dev, dtype=bf)
    w1 = torch.randn(E, d, h, device=dev, dtype=bf) * 0.02
    w3 = torch.randn(E, d, h, device=dev, dtype=bf) * 0.02
    w13 = torch.cat([w1, w3], 2)
    g = torch.randn(N, h, device=dev, dtype=bf)
    g13 = torch.randn(N, 2 * h, device=dev, dtype=bf)
    fl = 2 * N * d * h
    r = {}
    r["fwd two"] = timeit(lambda: (gmm(x, w1, offs), gmm(x, w3, offs)))
    r["fwd one [w1|w3]"] = timeit(lambda: gmm(x, w13, offs))
    r["dX two + add"] = timeit(lambda: gmm(g, w1.transpose(1, 2), offs) + gmm(g, w3.transpose(1, 2), offs))
    r["dX one K=2h"] = timeit(lambda: gmm(g13, w13.transpose(1, 2), offs))
    r["dW two"] = timeit(lambda: (gmm(x.t(), g, offs), gmm(x.t(), g, offs)))
    r["dW one N=2h"] = timeit(lambda: gmm(x.t(), g13, offs))
    xb = x.view(E, per, d)
    r["fwd two (bmm, equal groups)"] = timeit(lambda: (torch.bmm(xb, w1), torch.bmm(xb, w3)))
    r["fwd one gmm w1 only"] = timeit(lambda: gmm(x, w1, offs))
    r["fwd one bmm w1 only"] = timeit(lambda: torch.bmm(xb, w1))
    gb = g.view(E, per, h)
    r["dW one bmm w1 only"] = timeit(lambda: torch.bmm(xb.transpose(1, 2), gb))
    r["dW one gmm w1 only"] = timeit(lambda: gmm(x.t(), g, offs))
    r["dX one bmm w1 only"] = timeit(lambda: torch.bmm(gb, w1.transpose(1, 2)))
    r["dX one gmm w1 only"] = timeit(lambda: gmm(g, w1.transpose(1, 2), offs))
    for kk, v in r.items():
        n = 2 if ("two" in kk or "one [" in kk or "K=2h" in kk or "N=2h" in kk) else 1
        print(f"{name} {kk:<30} {v:8.3f} ms  {n * fl / v / 1e9:7.1f} TFLOP/s")
    del x, w1, w3, w13, g, g13
    torch.cuda.empty_cache()
