"""Makes Hugging Face checkpoints with transformers itself (not fmoec's export), for the import
test: `python make_checkpoints.py OUT`. Writes OUT/{llama,mixtral,qwen2_moe}/ (random weights,
save_pretrained, one model.safetensors in fp32; llama also sharded, in bf16 weights cast back),
OUT/tokens.json ([[ids]]) and OUT/{name}.logits (little-endian f32, [batch, tokens, vocab]).
The configs are ones an fmoec model file can describe: rotary base 10,000, RMSNorm eps 1e-5,
renormalised top-k; Qwen2-MoE's shared-expert gate and q/k/v biases are zero (fmoec's
shared experts are ungated, and `bias = false`)."""
import json
import os
import sys

import torch
import transformers

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
common = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
models = {
    "llama": transformers.LlamaForCausalLM(
        transformers.LlamaConfig(intermediate_size=96, **common)
    ),
    "mixtral": transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **common
        )
    ),
    "qwen2_moe": transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
            use_sliding_window=False,
            **common,
        )
    ),
}
tokens = [[(i * 37 + b * 11 + 5) % 256 for i in range(17)] for b in range(2)]
json.dump(tokens, open(os.path.join(out, "tokens.json"), "w"))
for name, model in models.items():
    with torch.no_grad():
        for p in model.parameters():  # transformers initialises norms to 1 and biases to 0
            p.add_(torch.randn_like(p) * 0.05)
        for n, p in model.named_parameters():
            if "shared_expert_gate" in n or n.endswith("_proj.bias"):
                p.zero_()
    model.eval()
    model.save_pretrained(os.path.join(out, name))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.float()
    logits.numpy().astype("<f4").tofile(os.path.join(out, f"{name}.logits"))
    print(name, type(model).__name__, tuple(logits.shape))
# the same Llama as transformers shards it, in bf16 (fmoec reads it as fp32)
models["llama"].to(torch.bfloat16).save_pretrained(
    os.path.join(out, "llama_bf16"), max_shard_size="100KB"
)
