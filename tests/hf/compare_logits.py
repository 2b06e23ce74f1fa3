"""Loads an `fmoec export --hf` folder with transformers (CPU, fp32) and compares its logits
with fmoec's on the same tokens: `python compare_logits.py EXPORT TOKENS.json LOGITS.bin ARCH`.
TOKENS.json: [[ids]]; LOGITS.bin: fmoec's logits, little-endian f32, [batch, tokens, vocab].
Prints the relative difference; exits 1 above 1e-4 or on a wrong architecture."""
import json
import sys

import numpy as np
import torch
import transformers

out, tokens_path, logits_path, arch = sys.argv[1:5]
tokens = torch.tensor(json.load(open(tokens_path)))
model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
model.eval()
assert type(model).__name__ == arch, f"loaded {type(model).__name__}, expected {arch}"
with torch.no_grad():
    logits = model(tokens).logits.float().numpy()
want = np.fromfile(logits_path, dtype="<f4").reshape(logits.shape)
rel = float(np.abs(logits - want).max() / np.abs(want).max())
print(f"{arch}: max |hf - fmoec| / max |fmoec| = {rel:.3e}")
tok = transformers.AutoTokenizer.from_pretrained(out) if __import__("os").path.exists(f"{out}/tokenizer.json") else None
if tok is not None:
    print("tokenizer:", tok("To be, or not to be").input_ids)
sys.exit(0 if rel < 1e-4 else 1)
