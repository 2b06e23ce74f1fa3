#!/usr/bin/env python3
"""Where the FP8 expert layer's error against f64 comes from (issue 17: SwiGLU 6.5e-2 on an
H100 against the 6e-2 target, GELU 5.4e-2): fmoec's recipe (row-wise scales for the left
operands, per-column for the weights, e4m3 with 448 / amax, bf16 outputs) emulated with
torch on the CPU, with each quantisation switched off in turn. Runs anywhere torch has
float8_e4m3fn (about 30 s on two cores): `python3 .ci/device-fp8-swiglu-error.py`.
"""
import torch
torch.manual_seed(0)
T, d, f = 4096, 512, 1536
F8 = torch.float8_e4m3fn
def q_rows(x):   # row-wise, as fmoec: e4m3(x * 448/amax) * amax/448
    a = x.abs().amax(1, keepdim=True).clamp_min(1e-12)
    return (x.float() * (448.0 / a)).clamp(-448, 448).to(F8).float() * (a / 448.0)
def q_cols(w):
    return q_rows(w.t()).t()
bf = lambda t: t.to(torch.bfloat16).float()
x = bf(torch.randn(T, d)); w1 = torch.randn(d, f) * d**-0.5; w3 = torch.randn(d, f) * d**-0.5
w2 = torch.randn(f, d) * f**-0.5
X, W1, W3, W2 = (t.double() for t in (x, w1, w3, w2))
silu = torch.nn.functional.silu; gelu = torch.nn.functional.gelu
ref_sw = (silu(X @ W1) * (X @ W3)) @ W2
ref_ge = gelu(X @ W1) @ W2
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
qx = q_rows(x)
h1 = bf(qx @ q_cols(w1)); h3 = bf(qx @ q_cols(w3))
h1e = bf(x @ w1); h3e = bf(x @ w3)
def out(h, quant_h=True):
    return bf((q_rows(h) if quant_h else h) @ (q_cols(w2) if quant_h else w2))
print("one FP8 matmul (x W1) vs f64:", rel(h1, X @ W1))
print("GELU layer:", rel(out(bf(gelu(h1))), ref_ge))
print("SwiGLU layer:", rel(out(bf(silu(h1) * h3)), ref_sw))
print("SwiGLU, h1 exact (bf16):", rel(out(bf(silu(h1e) * h3)), ref_sw))
print("SwiGLU, h3 exact (bf16):", rel(out(bf(silu(h1) * h3e)), ref_sw))
print("SwiGLU, both first matmuls exact, second FP8:", rel(out(bf(silu(h1e) * h3e)), ref_sw))
print("SwiGLU, first FP8, second bf16:", rel(out(bf(silu(h1) * h3), False), ref_sw))
print("SwiGLU, h = silu(h1) h3 vs f64:", rel(bf(silu(h1) * h3), silu(X @ W1) * (X @ W3)))
print("GELU, h = gelu(h1) vs f64:", rel(bf(gelu(h1)), gelu(X @ W1)))
# per-tensor amax / rms of h (how much of e4m3's range a row-wise scale wastes)
for name, h in [("gelu h", gelu(h1)), ("swiglu h", silu(h1) * h3)]:
    r = (h.abs().amax(1) / h.pow(2).mean(1).sqrt()).mean().item()
    print(name, "row amax / row rms:", round(r, 1))
