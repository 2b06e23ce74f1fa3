# fmoec_moe.py: fmoec's MoE layers inside Megatron-Core (core_v0.19, megatron-core 0.19.x).
# Hand-written model of the module `fmoec emit --megatron core_v0.19` is to generate: the layer
# table below is what the emitter fills in from the model file; everything else is fixed code.
"""FastMoE-style MoE layers (gates naive, noisy, gshard, switch, swipe; per-layer expert counts)
built into Megatron-Core's GPT through its layer spec, and trained by Megatron-Core's own
machinery: its expert-parallel process groups (parallel_state / ProcessGroupCollection), its
DistributedDataParallel and (distributed) optimizer, its clipping and its dist_checkpointing.

Owns: the gate semantics, the experts, the token exchange over Megatron's expert groups, and how
the layer's parameters are marked so that Megatron treats them as it treats its own MoE's.
Must not know about: any training loop, launcher or checkpoint folder (Megatron's), or fmoec's
other targets.

How Megatron-Core picks it up (no patch of Megatron's files):
  pretrain_gpt.py ... --spec fmoec_moe transformer_layer_spec
(with this file on PYTHONPATH). The spec is one `ModuleSpec` for every layer; each layer looks
up its global index in `_FMOEC_LAYERS` and becomes a dense layer or an fmoec MoE layer.

Parameter marking, as Megatron-Core marks its own MoE (megatron/core/transformer/moe):
  gate        replicated; `sequence_parallel=True` under sequence parallelism, so
              finalize_model_grads sums its gradient over the tensor group (each tensor rank
              routes its own slice of the sequence); summed over data ranks by DDP.
  experts     `allreduce=False` when experts are spread (expert-parallel > 1 or expert tensor
              size != tensor size): DDP reduces them over the expert-data-parallel group, the
              optimizer keeps them in its expert part, clipping counts them over the expert
              grid, and `sharded_state_dict` maps each local expert to its global index, so
              dist_checkpointing saves one copy per expert and reshards to any expert layout.
              Expert-tensor slices carry `tensor_model_parallel` / `partition_dim`.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import make_sharded_tensor_for_checkpoint

# ---------------------------------------------------------------------------------------------
# The model file's MoE layers (global 0-based layer index -> spec). Generated.
# ---------------------------------------------------------------------------------------------
_FMOEC_LAYERS = {
    1: dict(experts=8, top_k=2, gate='gshard', hidden=256, act='gelu',
            capacity=(1.2, 2.4), balance_loss=0.01, jitter=0.0, random_routing=True),
    3: dict(experts=8, top_k=2, gate='gshard', hidden=256, act='gelu',
            capacity=(1.2, 2.4), balance_loss=0.01, jitter=0.0, random_routing=True),
}
_GATES = ('naive', 'noisy', 'gshard', 'switch', 'swipe')


# ---------------------------------------------------------------------------------------------
# Collectives as autograd functions (all_to_all_single, all_gather, reduce_scatter: what both
# NCCL and gloo have; uneven sizes are padded).
# ---------------------------------------------------------------------------------------------
def _wire_dtype(x):
    # gloo has no half-precision collectives: exchange in fp32 there.
    if x.dtype in (torch.float16, torch.bfloat16) and dist.get_backend() == 'gloo':
        return torch.float32
    return x.dtype


def _all_to_all(x, send_splits, recv_splits, group):
    inp = x.to(_wire_dtype(x)).contiguous()
    out = inp.new_empty((int(sum(recv_splits)),) + tuple(inp.shape[1:]))
    dist.all_to_all_single(out, inp, output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out.to(x.dtype)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _padded(x, rows):
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows,) + tuple(x.shape[1:]))
    out[:x.shape[0]] = x
    return out


def _gather_rows(x, sizes, group):
    """Concatenate every rank's rows (rank i has sizes[i] rows) on every rank."""
    longest = max(sizes)
    wire = _wire_dtype(x)
    out = x.new_empty((longest * len(sizes),) + tuple(x.shape[1:]), dtype=wire)
    dist.all_gather_into_tensor(out, _padded(x.to(wire), longest), group=group)
    parts = [out[i * longest:i * longest + n] for i, n in enumerate(sizes)]
    return torch.cat(parts, 0).to(x.dtype)


def _reduce_scatter_rows(x, sizes, rank, group):
    """x holds every rank's rows (rank i's sizes[i] rows, in rank order); sum x over the group
    and keep this rank's rows."""
    longest = max(sizes)
    wire = _wire_dtype(x)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chunks = [_padded(x[s:s + n].to(wire), longest) for s, n in zip(starts, sizes)]
    out = x.new_empty((longest,) + tuple(x.shape[1:]), dtype=wire)
    dist.reduce_scatter_tensor(out, torch.cat(chunks, 0), group=group)
    return out[:sizes[rank]].to(x.dtype)


class _GatherFromExpertTensorGroup(torch.autograd.Function):
    """Forward: every expert-tensor rank gets the rows of all of them (they hold slices of the
    same experts); backward: each rank's input gradient is the sum of the slices' gradients."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatterToExpertTensorGroup(torch.autograd.Function):
    """Forward: sum the partial outputs of the expert-tensor slices, each rank keeping its own
    rows; backward: every slice's partial output gets the full gradient of those rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter_rows(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.sizes, ctx.group), None, None, None


class _OnlyOnRankZero(torch.autograd.Function):
    """`x` on expert-tensor rank 0 and zeros elsewhere, the gradient reaching every rank: the
    experts' output bias is added once to the summed output and stays identical on every rank."""

    @staticmethod
    def forward(ctx, x, keep):
        return x.clone() if keep else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------------------------------------
# Gates (FastMoE semantics, as in fmoec's other targets). Each returns
# (idx [N, k] global expert or -1 when dropped, score [N, k], balance loss).
# ---------------------------------------------------------------------------------------------
class _ExpertGroup:
    """The ranks that share one layer's experts: Megatron's expert-model-parallel group."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)


def _gate_rng():
    """Where the gates draw their noise: Megatron's model-parallel RNG stream (its tracker, the
    stream its tensor-parallel dropout uses), which Megatron's checkpoints save and restore per
    rank, so a resumed training draws the same noise. Outside Megatron (no tracker): torch's."""
    import contextlib
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    return tracker.fork() if tracker.is_initialized() else contextlib.nullcontext()


def _occurrence(idx_flat, num_experts):
    """For each entry of idx_flat (>= 0), how many earlier entries chose the same expert."""
    n = idx_flat.numel()
    key = idx_flat.clamp(min=0) * n + torch.arange(n, device=idx_flat.device)
    order = torch.sort(key).indices
    sorted_e = idx_flat.clamp(min=0)[order]
    counts = torch.bincount(sorted_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(n, device=idx_flat.device) - starts[sorted_e]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return pos


def _prune_local(idx, capacity, num_experts):
    """Keep the first `capacity[e]` entries (token-major order) for each expert e; drop the rest."""
    flat = idx.reshape(-1).clone()
    valid = (flat >= 0).nonzero().reshape(-1)
    chosen = flat[valid]
    pos = _occurrence(chosen, num_experts)
    flat[valid[pos >= capacity[chosen]]] = -1
    return flat.view_as(idx)


class NaiveGate(nn.Module):
    """Top-k of a linear layer's logits, softmax over the k chosen logits. No loss."""

    def __init__(self, d_model, num_experts, top_k, experts_group, bias=True, **_):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.experts_group = experts_group
        self.gate = nn.Linear(d_model, num_experts, bias=bias)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1, largest=True, sorted=True)
        score = F.softmax(val.float(), dim=-1).to(x.dtype)
        return idx, score, logits.new_zeros((), dtype=torch.float32)


class NoisyGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017) as FastMoE: loss = cv^2(importance) + cv^2(load)."""

    def __init__(self, d_model, num_experts, top_k, experts_group, **_):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.experts_group = experts_group
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))
        self.noise_epsilon = 1e-2

    @staticmethod
    def _cv_squared(x):
        if x.shape[0] == 1:
            return x.new_zeros(()).float()
        x = x.float()
        return x.var() / (x.mean() ** 2 + 1e-10)

    def forward(self, x):
        clean = x @ self.w_gate
        if not self.training:
            val, idx = torch.topk(clean, k=self.top_k, dim=1)
            score = F.softmax(val.float(), dim=1).to(x.dtype)
            return idx, score, clean.new_zeros((), dtype=torch.float32)
        stddev = F.softplus(x @ self.w_noise) + self.noise_epsilon
        with _gate_rng():
            noise = torch.randn_like(clean)
        noisy = clean + noise * stddev
        m = min(self.top_k + 1, self.num_experts)
        top_val, top_idx = noisy.topk(m, dim=1)
        k_val, k_idx = top_val[:, :self.top_k], top_idx[:, :self.top_k]
        k_score = F.softmax(k_val.float(), dim=1)
        gates = torch.zeros_like(clean, dtype=torch.float32).scatter(1, k_idx, k_score)
        if self.top_k < self.num_experts:
            normal = torch.distributions.normal.Normal(0.0, 1.0)
            thr_in = top_val[:, self.top_k:self.top_k + 1]
            thr_out = top_val[:, self.top_k - 1:self.top_k]
            is_in = noisy > thr_in
            prob = torch.where(is_in, normal.cdf(((clean - thr_in) / stddev).float()),
                               normal.cdf(((clean - thr_out) / stddev).float()))
            load = prob.sum(0)
        else:
            load = (gates > 0).sum(0).float()
        loss = self._cv_squared(gates.sum(0)) + self._cv_squared(load)
        return k_idx, k_score.to(x.dtype), loss


class GShardGate(NaiveGate):
    """GShard: top-2, loss mean(c_e * m_e) * E^2, capacity ceil(c * N) * k // E per expert from
    this rank's tokens, then random routing drops the second expert when 2 * p2 < U(0, 1)."""

    def __init__(self, d_model, num_experts, top_k, experts_group, capacity=(1.2, 2.4),
                 random_routing=True, **kw):
        super().__init__(d_model, num_experts, top_k, experts_group, **kw)
        if top_k != 2:
            raise ValueError('fmoec: the gshard gate routes to 2 experts, not {}'.format(top_k))
        self.capacity, self.random_routing = tuple(capacity), random_routing

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=2, dim=-1, largest=True, sorted=True)
        score = F.softmax(val.float(), dim=-1)
        n = logits.shape[0]
        top1 = idx[:, 0]
        c_e = torch.zeros(self.num_experts, device=x.device).scatter_add(
            0, top1, torch.ones_like(top1, dtype=torch.float32)) / n
        m_e = F.softmax(logits.float(), dim=1).mean(0)
        loss = (c_e * m_e).mean() * (self.num_experts ** 2)
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * n)) * 2 // self.num_experts
        capacity = torch.full((self.num_experts,), cap, dtype=torch.long, device=x.device)
        idx = _prune_local(idx, capacity, self.num_experts)
        if self.random_routing and self.training:
            with _gate_rng():
                u = torch.rand(n, device=x.device)
            drop = 2 * score[:, 1] < u
            idx[:, 1] = torch.where(drop, torch.full_like(idx[:, 1], -1), idx[:, 1])
        return idx, score.to(x.dtype), loss


class SwitchGate(NaiveGate):
    """Switch: logits + U(1 - eps, 1 + eps) in training, softmax, top-1; capacity
    ceil(c * N / experts per rank) per expert over the whole expert group, granted to ranks in
    rank order; loss = sum(f_e * p_e) * E over the kept tokens."""

    def __init__(self, d_model, num_experts, top_k, experts_group, capacity=(1.2, 2.4),
                 jitter=0.1, **kw):
        super().__init__(d_model, num_experts, top_k, experts_group, **kw)
        if top_k != 1:
            raise ValueError('fmoec: the switch gate routes to 1 expert, not {}'.format(top_k))
        self.capacity, self.jitter = tuple(capacity), jitter

    def forward(self, x):
        logits = self.gate(x)
        if self.training and self.jitter > 0:
            with _gate_rng():
                noise = torch.rand_like(logits) * 2 * self.jitter + 1.0 - self.jitter
            logits = logits + noise
        prob = F.softmax(logits.float(), dim=-1)
        score, idx = torch.topk(prob, k=1, dim=-1)
        group = self.experts_group
        local = self.num_experts // group.size
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * x.shape[0] / local))
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
            allowed = _grant_capacity(counts, cap, local, group)
        idx = _prune_local(idx, allowed, self.num_experts)
        kept = idx[idx > -1]
        frac = torch.zeros(self.num_experts, device=x.device).scatter_add(
            0, kept, torch.ones_like(kept, dtype=torch.float32)) / max(kept.numel(), 1)
        p = prob.sum(0) / max(kept.numel(), 1)
        loss = (frac * p).sum() * self.num_experts
        return idx, score.to(x.dtype), loss


def _grant_capacity(counts, cap, local, group):
    """Global capacity `cap` per expert, granted to the ranks of the expert group in rank order.
    counts: this rank's tokens per global expert. Returns this rank's allowance per expert."""
    w = group.size
    if w == 1:
        return counts.clamp(max=cap)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group.group)
    recv = recv.view(w, local)                     # [source rank, my local expert]
    before = torch.cumsum(recv, 0) - recv
    grant = (cap - before).clamp(min=0)
    grant = torch.min(grant, recv).reshape(-1).contiguous()
    back = torch.empty_like(grant)
    dist.all_to_all_single(back, grant, group=group.group)
    return back


class SwipeGate(NaiveGate):
    """SWIPE (FastMoE): per top-k slot, each rank of the expert group accepts at most its
    remaining capacity (initially N * k) of tokens, in source-rank order; rejected tokens are
    re-assigned, in order, to ranks with capacity left (their expert `slot % experts per rank`)."""

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1)
        if not self.training:
            return idx, F.softmax(val.float(), dim=-1).to(x.dtype), logits.new_zeros(())
        group = self.experts_group
        local = self.num_experts // group.size
        cap = x.shape[0] * self.top_k
        rows = torch.arange(x.shape[0], device=x.device)
        idxs, vals = [], []
        for k in range(self.top_k):
            new_idx, cap = _swipe_once(idx[:, k], cap, local, k % local, group)
            idxs.append(new_idx)
            vals.append(logits[rows, new_idx])
        idx = torch.stack(idxs, 1)
        score = F.softmax(torch.stack(vals, 1).float(), dim=-1).to(x.dtype)
        return idx, score, logits.new_zeros((), dtype=torch.float32)


def _swipe_once(idx, cap, local, bias, group):
    w, me = group.size, group.rank
    dev = idx.device
    with torch.no_grad():
        worker = (idx // local).cpu()
        lec = torch.bincount(worker, minlength=w).long()
        if w > 1:
            gec = torch.empty_like(lec).to(dev)
            dist.all_to_all_single(gec, lec.to(dev), group=group.group)
            gec = gec.cpu()
        else:
            gec = lec.clone()
        drop = torch.zeros(w, dtype=torch.long)
        gec = gec.tolist()
        for i in range(w):
            if cap >= gec[i]:
                cap -= gec[i]
            else:
                drop[i] = gec[i] - cap
                gec[i] = cap
                cap = 0
        gec_t = torch.tensor(gec, dtype=torch.long)
        if w > 1:
            lec = torch.empty_like(gec_t).to(dev)
            dist.all_to_all_single(lec, gec_t.to(dev), group=group.group)
            lec = lec.cpu()
            drop = drop.to(dev)
            dist.all_reduce(drop, group=group.group)
            drop = drop.cpu()
            caps = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(w)]
            dist.all_gather(caps, torch.tensor([cap], dtype=torch.long, device=dev),
                            group=group.group)
            gcap = [int(c.item()) for c in caps]
        else:
            lec = gec_t.clone()
            gcap = [cap]
        lec = lec.tolist()
        drop = drop.tolist()
        j = 0
        for i in range(w):
            while drop[i] > 0:
                count = min(drop[i], gcap[j])
                drop[i] -= count
                gcap[j] -= count
                if i == me:
                    lec[j] += count
                if j == me:
                    cap -= count
                if drop[i] > 0:
                    j += 1
        out = idx.clone().cpu()
        pos = _occurrence(worker, w)
        limit = torch.tensor(lec, dtype=torch.long)
        keep = pos < limit[worker]
        taken = torch.bincount(worker[keep], minlength=w)
        left = (limit - taken).clamp(min=0)
        dropped = (~keep).nonzero().reshape(-1)
        target = torch.repeat_interleave(torch.arange(w), left)[:dropped.numel()]
        out[dropped] = target * local + bias
    return out.to(idx.device), cap


_GATE_CLASSES = {'naive': NaiveGate, 'noisy': NoisyGate, 'gshard': GShardGate,
                 'switch': SwitchGate, 'swipe': SwipeGate}


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------
class Experts(nn.Module):
    """`num_local` MLP experts stacked; each expert-tensor rank holds `hidden / etp` of each:
    fc1_weight [n, h/etp, d], fc1_bias [n, h/etp], fc2_weight [n, d, h/etp], fc2_bias [n, d]
    (replicated over etp). SwiGLU adds fc1_gate_weight [n, h/etp, d] (no bias):
    fc2(silu(fc1_gate x) * fc1 x), as fmoec's other targets."""

    def __init__(self, num_local, d_model, hidden, act, etp_size, bias, params_dtype):
        super().__init__()
        if hidden % etp_size != 0:
            raise ValueError('fmoec: expert hidden size {} is not divisible by the expert tensor '
                             'size {}'.format(hidden, etp_size))
        h = hidden // etp_size
        self.num_local, self.act, self.h = num_local, act, h
        self.fc1_weight = nn.Parameter(torch.empty(num_local, h, d_model, dtype=params_dtype))
        self.fc1_bias = (nn.Parameter(torch.zeros(num_local, h, dtype=params_dtype))
                         if bias else None)
        self.fc1_gate_weight = (nn.Parameter(torch.empty(num_local, h, d_model,
                                                         dtype=params_dtype))
                                if act == 'swiglu' else None)
        self.fc2_weight = nn.Parameter(torch.empty(num_local, d_model, h, dtype=params_dtype))
        self.fc2_bias = (nn.Parameter(torch.zeros(num_local, d_model, dtype=params_dtype))
                         if bias else None)

    def forward(self, x, counts, add_output_bias):
        outs, start = [], 0
        b2 = None
        if self.fc2_bias is not None:
            b2 = _OnlyOnRankZero.apply(self.fc2_bias, add_output_bias)
        for e, c in enumerate(counts):
            rows = x[start:start + c]
            start += c
            h = F.linear(rows, self.fc1_weight[e],
                         None if self.fc1_bias is None else self.fc1_bias[e])
            if self.act == 'gelu':
                h = F.gelu(h)
            elif self.act == 'relu':
                h = F.relu(h)
            else:
                h = F.silu(F.linear(rows, self.fc1_gate_weight[e])) * h
            outs.append(F.linear(h, self.fc2_weight[e], None if b2 is None else b2[e]))
        if not outs:
            return x.new_zeros((0, self.fc2_weight.shape[1]))
        out = torch.cat(outs, 0)
        # touch every expert parameter so each has a gradient, even with no tokens routed to it
        extra = sum(p.sum() for p in self.parameters()) * 0.0
        return out + extra.to(out.dtype)


# ---------------------------------------------------------------------------------------------
# The MoE layer: Megatron's MLP interface, forward(x [s, b, d]) -> (output [s, b, d], None)
# ---------------------------------------------------------------------------------------------
class FmoecMoELayer(MegatronModule):
    """One MoE layer with FastMoE's gate semantics on Megatron-Core's expert groups.

    Tokens: each tensor rank routes its own slice of the sequence (Megatron-Core requires
    sequence parallelism for MoE with tensor parallelism); the chosen tokens travel to their
    expert's rank with all_to_all_single over the expert-model-parallel group; with expert
    tensor parallelism the ranks holding slices of the same experts gather each other's tokens,
    each computes its slice, and the partial outputs are summed back (reduce-scatter)."""

    def __init__(self, config, spec, layer_index, pg_collection=None, seed=1234, **_):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg = pg_collection
        self.layer_index = layer_index
        self.layer_number = None          # 1-based, set by TransformerLayer (set_layer_number)
        self.spec = dict(spec)
        if spec['gate'] not in _GATE_CLASSES:
            raise ValueError('fmoec: layer {}: unknown gate {!r} (known: {})'.format(
                layer_index, spec['gate'], ', '.join(_GATES)))
        self.ep = _ExpertGroup(pg_collection.ep)
        self.etp_group = pg_collection.expt_tp
        self.etp_size = dist.get_world_size(self.etp_group)
        self.etp_rank = dist.get_rank(self.etp_group)
        self.tp_size = dist.get_world_size(pg_collection.tp)
        experts = spec['experts']
        if experts % self.ep.size != 0:
            raise ValueError('fmoec: layer {}: {} experts do not divide over {} expert-parallel '
                             'ranks'.format(layer_index, experts, self.ep.size))
        self.num_experts, self.num_local = experts, experts // self.ep.size
        self.top_k, self.balance_weight = spec['top_k'], float(spec['balance_loss'])
        bias = config.add_bias_linear
        self.gate = _GATE_CLASSES[spec['gate']](
            config.hidden_size, experts, spec['top_k'], self.ep, bias=bias,
            capacity=spec.get('capacity') or (1.2, 2.4),
            random_routing=spec.get('random_routing', True), jitter=spec.get('jitter', 0.0))
        self.experts = Experts(self.num_local, config.hidden_size, spec['hidden'], spec['act'],
                               self.etp_size, bias, config.params_dtype)
        if config.perform_initialization:
            self._init_weights(config, seed)
        self._mark_parameters(config)

    def _init_weights(self, config, seed):
        """Megatron's init (normal(0, std), output layers std / sqrt(2 * layers), zero biases),
        each expert's full matrices from its own generator (seed, layer, global expert) and the
        gate from one per layer, so the weights do not depend on how ranks share them."""
        std = config.init_method_std
        out_std = std / math.sqrt(2.0 * config.num_layers)
        ex, h, t = self.experts, self.experts.h, self.etp_rank
        with torch.no_grad():
            for e in range(self.num_local):
                g = torch.Generator().manual_seed(int(seed) * 1000003 + self.layer_index * 4099
                                                  + self.ep.rank * self.num_local + e)
                full_h = h * self.etp_size
                w1 = torch.empty(full_h, config.hidden_size).normal_(0.0, std, generator=g)
                ex.fc1_weight[e].copy_(w1[t * h:(t + 1) * h])
                if ex.fc1_gate_weight is not None:
                    w3 = torch.empty(full_h, config.hidden_size).normal_(0.0, std, generator=g)
                    ex.fc1_gate_weight[e].copy_(w3[t * h:(t + 1) * h])
                w2 = torch.empty(config.hidden_size, full_h).normal_(0.0, out_std, generator=g)
                ex.fc2_weight[e].copy_(w2[:, t * h:(t + 1) * h])
            for p in (ex.fc1_bias, ex.fc2_bias):
                if p is not None:
                    p.zero_()
            g = torch.Generator().manual_seed(int(seed) * 1000003 + self.layer_index * 4099
                                              + 999983)
            for p in self.gate.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=g))
                else:
                    p.zero_()

    def _mark_parameters(self, config):
        for p in self.gate.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        # Megatron-Core's rule (tensor_parallel/layers.py): expert parameters use the expert
        # groups when experts are spread or sliced differently from the dense layers.
        spread = (self.ep.size > 1
                  or config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        for name, p in self.experts.named_parameters():
            p.allreduce = not spread
            sliced = name != 'fc2_bias'
            p.tensor_model_parallel = sliced and self.etp_size > 1
            p.partition_dim = 2 if name == 'fc2_weight' else 1
            p.partition_stride = 1

    def set_layer_number(self, layer_number):
        self.layer_number = layer_number

    def forward(self, hidden_states, padding_mask=None, **_):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx, score, loss = self.gate(x)
        n, k = idx.shape
        flat = idx.reshape(-1)
        valid = (flat >= 0).nonzero().reshape(-1)
        chosen = flat[valid]
        token = valid // k
        # sort by expert (unique keys keep token order within an expert without `stable=`)
        order = torch.sort(chosen * (n * k) + valid).indices
        chosen, token, slot = chosen[order], token[order], valid[order]
        counts = torch.bincount(chosen, minlength=self.num_experts)
        w, local = self.ep.size, self.num_local
        if w > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.ep.group)
            send = counts.view(w, local).sum(1).tolist()
            recv_counts = recv_counts.view(w, local)
            recv = recv_counts.sum(1).tolist()
            buf = _AllToAll.apply(x[token], send, recv, self.ep.group)
            # source-major -> expert-major
            chunk_sizes = recv_counts.reshape(-1).tolist()
            starts = [0]
            for c in chunk_sizes:
                starts.append(starts[-1] + c)
            perm = []
            for e in range(local):
                for src in range(w):
                    s = starts[src * local + e]
                    perm.extend(range(s, s + chunk_sizes[src * local + e]))
            perm = torch.tensor(perm, dtype=torch.long, device=x.device)
            y = self._experts(buf[perm], recv_counts.sum(0))
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=x.device)
            y = _AllToAll.apply(y[inv], recv, send, self.ep.group)
        else:
            y = self._experts(x[token], counts)
        weight = score.reshape(-1)[slot].unsqueeze(1).to(y.dtype)
        out = torch.zeros(n, y.shape[1], dtype=y.dtype, device=y.device).index_add(
            0, token, y * weight)
        self.last_loss = loss.detach()
        self.last_dropped = float(n * k - valid.numel()) / max(n * k, 1)
        if self.training and self.layer_number is not None:
            # Megatron's training log reports it as `load_balancing_loss` (per layer with
            # --moe-per-layer-logging), unweighted like its own routers' losses: the mean over
            # the tensor ranks' slices of the sequence, then over data ranks and micro-batches
            get_moe_metrics_tracker().record(
                'load_balancing_loss', loss.detach() / self.tp_size, self.layer_number,
                self.config.num_layers, reduce_group=self.pg.tp, needs_dp_avg=True)
        if self.training and self.balance_weight != 0.0 and loss.requires_grad:
            # Megatron's own hook for auxiliary losses: the schedule sets its scale (loss
            # scale / micro-batches) and its backward adds d(weight * loss) to the gradient.
            # Each tensor rank routes a slice of the sequence: their losses are averaged.
            out = MoEAuxLossAutoScaler.apply(out, loss * (self.balance_weight / self.tp_size))
        return out.reshape(shape), None

    def _experts(self, rows, counts):
        """Run the local experts on `rows` (sorted by local expert, `counts` per expert)."""
        counts = counts.reshape(-1)
        if self.etp_size == 1:
            return self.experts(rows, counts.tolist(), True)
        # every expert-tensor rank computes its slice of every rank's rows
        sizes_t = torch.zeros(self.etp_size, dtype=torch.long)
        sizes_t[self.etp_rank] = rows.shape[0]
        dist.all_reduce(sizes_t, group=self.etp_group)
        all_counts = [torch.zeros_like(counts) for _ in range(self.etp_size)]
        dist.all_gather(all_counts, counts.contiguous(), group=self.etp_group)
        sizes = sizes_t.tolist()
        gathered = _GatherFromExpertTensorGroup.apply(rows, sizes, self.etp_rank, self.etp_group)
        # rank-major -> expert-major, so each expert's rows are contiguous
        starts, perm = [0], []
        for c in all_counts:
            starts.append(starts[-1] + int(c.sum()))
        per_expert = torch.stack(all_counts, 0)             # [etp rank, local expert]
        offsets = torch.cumsum(per_expert, 1) - per_expert
        for e in range(self.num_local):
            for r in range(self.etp_size):
                s = starts[r] + int(offsets[r, e])
                perm.extend(range(s, s + int(per_expert[r, e])))
        perm = torch.tensor(perm, dtype=torch.long, device=rows.device)
        y = self.experts(gathered[perm], per_expert.sum(0).tolist(), self.etp_rank == 0)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=rows.device)
        return _ReduceScatterToExpertTensorGroup.apply(y[inv], sizes, self.etp_rank,
                                                       self.etp_group)

    def sharded_state_dict(self, prefix='', sharded_offsets=(), metadata=None):
        """Gate: replicated (one copy). Experts: local expert i of expert rank r is global expert
        r * num_local + i along axis 0, the expert-tensor slice along its hidden axis; one copy
        per expert-data-parallel group (replica id = expert-data rank)."""
        metadata = metadata or {}
        state = {}
        gate_state = self.gate.state_dict(prefix='', keep_vars=True)
        for name, tensor in gate_state.items():
            state[prefix + 'gate.' + name] = make_sharded_tensor_for_checkpoint(
                tensor, prefix + 'gate.' + name, prepend_offsets=sharded_offsets,
                tp_group=self.pg.tp, dp_cp_group=metadata.get('dp_cp_group', self.pg.dp_cp))
        edp_rank = dist.get_rank(self.pg.expt_dp)
        prepend = len(sharded_offsets)
        for name, tensor in self.experts.state_dict(prefix='', keep_vars=True).items():
            offsets = list(sharded_offsets) + [(prepend, self.ep.rank, self.ep.size)]
            etp_replica = 0
            if name == 'fc2_bias':
                etp_replica = self.etp_rank           # replicated over expert-tensor ranks
            elif self.etp_size > 1:
                axis = 2 if name == 'fc2_weight' else 1
                offsets.append((prepend + axis, self.etp_rank, self.etp_size))
            key = prefix + 'experts.' + name
            state[key] = ShardedTensor.from_rank_offsets(
                key, tensor, *offsets, replica_id=(0, etp_replica, edp_rank),
                prepend_axis_num=prepend)
        return state


# ---------------------------------------------------------------------------------------------
# The layer spec Megatron-Core builds the GPT from
# ---------------------------------------------------------------------------------------------
def _native_submodules(config, moe):
    """Megatron-Core's own submodules for a dense layer or (moe=True) a MoE layer, from the
    backend the config names (Transformer Engine or the local modules)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    num_experts = config.num_moe_experts if moe else None
    if config.transformer_impl == 'transformer_engine':
        return specs.get_gpt_layer_with_transformer_engine_submodules(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm)
    return specs.get_gpt_layer_local_submodules(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm,
        normalization=config.normalization)


class FmoecTransformerLayer(TransformerLayer):
    """Megatron-Core's TransformerLayer whose MLP is fmoec's MoE layer where the model file
    says so (by global layer index) and Megatron's dense MLP elsewhere."""

    def __init__(self, config, submodules=None, layer_number=1, pg_collection=None,
                 vp_stage=None, fmoec_layers=None, fmoec_seed=None, **kwargs):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        table = _FMOEC_LAYERS if fmoec_layers is None else fmoec_layers
        offset = get_transformer_layer_offset(config, vp_stage, dist.get_rank(pg_collection.pp))
        index = layer_number + offset - 1                   # global, 0-based
        spec = table.get(index)
        if submodules is None:
            # MoE layers take Megatron's MoE layer submodules (a separate pre-MLP norm) with the
            # MLP replaced; dense layers Megatron's dense ones.
            submodules = _native_submodules(config, moe=spec is not None
                                            and config.num_moe_experts is not None)
        if spec is not None:
            import dataclasses
            seed = fmoec_seed if fmoec_seed is not None else _training_seed()

            def build_mlp(config, pg_collection, is_mtp_layer=False, name=None):
                return FmoecMoELayer(config, spec, index, pg_collection=pg_collection,
                                     seed=seed)

            submodules = dataclasses.replace(submodules, mlp=build_mlp)
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)


def _training_seed():
    try:
        from megatron.training import get_args
        return get_args().seed
    except Exception:     # not inside Megatron's training (tests): a fixed seed
        return 1234


def layer_spec(config=None, layers=None, seed=None):
    """The spec of every layer (a harness passes its own table and seed)."""
    params = {}
    if layers is not None:
        params['fmoec_layers'] = layers
    if seed is not None:
        params['fmoec_seed'] = seed
    return ModuleSpec(module=FmoecTransformerLayer, params=params)


# `pretrain_gpt.py --spec fmoec_moe transformer_layer_spec`
transformer_layer_spec = layer_spec()
