"""FastMoE's own MoE layer for test_engines.py, and the deliberate differences as adapters.

FastMoE's Python is imported from the checkout FMOEC_FASTMOE names (PyPI has no FastMoE, and
nothing of it is copied here); its compiled extension `fmoe_cuda` is the harness's pure-torch
emulation (FMOEC_FASTMOE_EMU, else shared/megatron-harness/fmoe_emu beside this repository),
which lacks `swipe_once`: `_swipe_once` below follows FastMoE's cuda/balancing.cu. FastMoE's
layer also needs `tree` (PyPI `dm-tree`).

Each deliberate difference of README.md's list ("Where fmoec differs from FastMoE on purpose")
is one adapter here that changes FastMoE's layer in that one respect; `check` shows for each
case that FastMoE's layer with the adapters gives what `fmoec run` gives, and that without the
adapter it does not (where the case can tell).
"""
import contextlib
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.environ.get('FMOEC_FASTMOE')
_HERE = os.path.dirname(os.path.abspath(__file__))
EMU = os.environ.get('FMOEC_FASTMOE_EMU') or os.path.normpath(
    os.path.join(_HERE, '..', '..', '..', 'shared', 'megatron-harness', 'fmoe_emu'))


def _load():
    if not ROOT or not os.path.isdir(os.path.join(ROOT, 'fmoe')):
        raise RuntimeError('FMOEC_FASTMOE must name a FastMoE checkout (the folder holding fmoe/)')
    if not os.path.isfile(os.path.join(EMU, 'fmoe_cuda.py')):
        raise RuntimeError('no fmoe_cuda.py in {} (set FMOEC_FASTMOE_EMU)'.format(EMU))
    for path in (EMU, ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)
    import fmoe_cuda
    if not hasattr(fmoe_cuda, 'swipe_once'):
        fmoe_cuda.swipe_once = _swipe_once
    import fmoe
    import fmoe.gates
    import fmoe.gates.gshard_gate
    import fmoe.linear
    import fmoe.transformer
    return fmoe


def _swipe_once(gate_idx, capacity, n_expert, n_worker, bias):
    """FastMoE's `swipe_once` (cuda/balancing.cu): one top-k slot; each worker accepts at most
    `capacity` tokens from the workers in rank order, and the rejected ones go to workers with
    capacity left (their expert `bias`)."""
    import fmoe_cuda
    group = fmoe_cuda._comm
    rank = dist.get_rank(group) if n_worker > 1 else 0
    cap = int(capacity.item())
    gidx = gate_idx.cpu().clone()
    lec = torch.bincount(gidx // n_expert, minlength=n_worker).long()
    gec = (fmoe_cuda.expert_exchange(lec, 1, n_worker) if n_worker > 1 else lec.clone()).tolist()
    drop = [0] * n_worker
    for i in range(n_worker):
        if cap >= gec[i]:
            cap -= gec[i]
        else:
            drop[i] = gec[i] - cap
            gec[i] = cap
            cap = 0
    if n_worker > 1:
        lec = fmoe_cuda.expert_exchange(torch.tensor(gec, dtype=torch.long), 1, n_worker).tolist()
        drops = torch.tensor(drop, dtype=torch.long)
        dist.all_reduce(drops, group=group)
        drop = drops.tolist()
        caps = [torch.zeros(1, dtype=torch.long) for _ in range(n_worker)]
        dist.all_gather(caps, torch.tensor([cap], dtype=torch.long), group=group)
        gcap = [int(c) for c in caps]
    else:
        lec, gcap = list(gec), [cap]

    def update(i, j, count):
        nonlocal cap
        if i == rank:
            lec[j] += count
        if j == rank:
            gec[i] += count
            cap -= count

    j = 0
    for i in range(n_worker):
        while drop[i] > 0:
            if drop[i] > gcap[j]:
                drop[i] -= gcap[j]
                update(i, j, gcap[j])
                j += 1
            else:
                gcap[j] -= drop[i]
                update(i, j, drop[i])
                break
    for t in range(gidx.numel()):
        w = int(gidx[t]) // n_expert
        if lec[w] > 0:
            lec[w] -= 1
        else:
            gidx[t] = -1
    k = 0
    for t in range(gidx.numel()):
        if gidx[t] != -1:
            continue
        while lec[k] == 0:
            k += 1
        lec[k] -= 1
        gidx[t] = k * n_expert + bias
    return gidx, torch.tensor(cap, dtype=torch.long)


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _given(draws):
    """A stand-in for torch.rand/randn/*_like returning `draws` (shape checked)."""
    def draw(*args, **kwargs):
        return draws.clone()
    return draw


class _Expert(nn.Module):
    """One expert for FastMoE's FMoE made of FastMoE's FMoELinear, where FastMoE's own `_Expert`
    cannot express it: SwiGLU (`silu(htoh4 x) * up x`, as fmoec) and experts without biases."""
    def __init__(self, fmoe, d_model, hidden, act, bias):
        super(_Expert, self).__init__()
        self.htoh4 = fmoe.linear.FMoELinear(1, d_model, hidden, bias=bias)
        self.up = fmoe.linear.FMoELinear(1, d_model, hidden, bias=False) if act == 'swiglu' else None
        self.h4toh = fmoe.linear.FMoELinear(1, hidden, d_model, bias=bias)
        self.act = act

    def forward(self, inp, count):
        h = self.htoh4(inp, count)
        if self.act == 'gelu':
            h = F.gelu(h)
        elif self.act == 'relu':
            h = F.relu(h)
        else:
            h = F.silu(h) * self.up(inp, count)
        return self.h4toh(h, count)


def _gate_class(fmoe, name):
    g = fmoe.gates
    return {'naive': g.NaiveGate, 'noisy': g.NoisyGate, 'gshard': g.GShardGate,
            'switch': g.SwitchGate, 'swipe': g.SwipeGate}[name]


def build(config, tensors, experts=None, world_size=1, group=None):
    """FastMoE's layer with the case's weights: FastMoE's FMoETransformerMLP where it expresses
    the experts (GELU/ReLU with biases), else its FMoE with `_Expert`. `experts`: the global
    experts this process holds (default all)."""
    fmoe = _load()
    experts = list(range(config['experts'])) if experts is None else experts
    d, h, bias, act = config['width'], config['hidden'], config['bias'], config['act']
    cls = _gate_class(fmoe, config['gate'])
    common = dict(num_expert=len(experts), d_model=d, world_size=world_size, moe_group=group,
                  top_k=config['top_k'], gate=cls, gate_bias=bias)
    if act in ('gelu', 'relu') and bias:
        layer = fmoe.transformer.FMoETransformerMLP(
            d_hidden=h, activation=nn.GELU() if act == 'gelu' else nn.ReLU(), **common)
    else:
        layer = fmoe.FMoE(expert=lambda dm: _Expert(fmoe, dm, h, act, bias), **common)
    gate = layer.gate
    if config['gate'] in ('gshard', 'switch'):
        gate.capacity = tuple(config['capacity'])
    if config['gate'] == 'gshard':
        gate.random_routing = config['random_routing']
    if config['gate'] == 'switch':
        gate.switch_eps = config['jitter']
    p = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
    with torch.no_grad():
        if config['gate'] == 'noisy':
            gate.w_gate.copy_(p['gate.weight'])
            gate.w_noise.copy_(p['gate.noise'])
        else:
            gate.gate.weight.copy_(p['gate.weight'].t())
            if bias:
                gate.gate.bias.copy_(p['gate.bias'])
        for i, e in enumerate(experts):
            ex = layer.experts[i]
            ex.htoh4.weight[0].copy_(p['experts.w1'][e].t())
            ex.h4toh.weight[0].copy_(p['experts.w2'][e].t())
            if act == 'swiglu':
                ex.up.weight[0].copy_(p['experts.w3'][e].t())
            if bias:
                ex.htoh4.bias[0].copy_(p['experts.b1'][e])
                ex.h4toh.bias[0].copy_(p['experts.b2'][e])
    return layer


def _shared(config, p, x):
    """DeepSeek-MoE's shared experts (FastMoE has none): one MLP beside FastMoE's layer."""
    if not config['shared']:
        return 0.0
    h = F.linear(x, p['shared.w1'].t(), p.get('shared.b1'))
    act = config['shared']['act']
    if act == 'gelu':
        h = F.gelu(h)
    elif act == 'relu':
        h = F.relu(h)
    else:
        h = F.silu(h) * F.linear(x, p['shared.w3'].t())
    return F.linear(h, p['shared.w2'].t(), p.get('shared.b2'))


# ---------------------------------------------------------------------------------------------
# The deliberate differences, one adapter each (README.md, "Where fmoec differs from FastMoE on
# purpose"). Each wraps the gate's forward; `draws` are the runtime's.
# ---------------------------------------------------------------------------------------------
def switch_jitter_on_the_gate_input(gate, draws, config):
    """Switch `jitter`: fmoec multiplies the gate's input by U(1 - eps, 1 + eps); FastMoE adds
    U(1 - eps, 1 + eps) to the logits. Adapted: FastMoE's gate sees the jittered input and its
    own noise is eps = 0 (every logit + 1, which the softmax ignores)."""
    eps = config['jitter']
    forward = gate.forward
    gate.switch_eps = 0.0

    def jittered(inp):
        if gate.training and draws is not None:
            inp = inp * (draws * (2.0 * eps) + (1.0 - eps))
        return forward(inp)
    gate.forward = jittered


def _fmoec_capacity(idx, capacity, num_experts):
    """fmoec's capacity rule: each expert keeps its first `capacity` slots in slot-major order."""
    keep = idx.clone()
    used = [0] * num_experts
    for slot in range(idx.shape[1]):
        for t in range(idx.shape[0]):
            e = int(idx[t, slot])
            if e < 0:
                continue
            if used[e] >= capacity:
                keep[t, slot] = -1
            else:
                used[e] += 1
    return keep


def gshard_capacity_after_random_routing(gate, config, fmoe):
    """GShard capacity: fmoec keeps ceil(c * k * T / E) slots per expert in slot-major order,
    after random routing; FastMoE keeps ceil(c * T) * k // E in arrival order, then routes
    randomly. Adapted: FastMoE's pruning is off and fmoec's rule follows its random routing."""
    forward = gate.forward
    native = fmoe.gates.gshard_gate.fmoe_native

    def capacity_after(inp):
        with _patched(native, 'prune_gate_by_capacity', lambda idx, *a: idx.clone()):
            idx, score = forward(inp)
        rate = gate.capacity[0 if gate.training else 1]
        cap = int(math.ceil(rate * (gate.top_k * inp.shape[0]) / gate.tot_expert))
        return _fmoec_capacity(idx.view(-1, gate.top_k), cap, gate.tot_expert), score
    gate.forward = capacity_after


def naive_slot_balance_loss(gate):
    """Naive gate's balance loss: fmoec's E * sum_e f_e * P_e (f_e the fraction of the slots,
    P_e the mean probability); FastMoE's naive gate sets a zero loss."""
    forward = gate.forward

    def with_loss(inp):
        idx, score, logits = forward(inp, return_all_scores=True)
        slots = idx.reshape(-1)
        f = torch.zeros(gate.tot_expert).scatter_add(0, slots, torch.ones(slots.numel())) / slots.numel()
        p = F.softmax(logits.float(), dim=-1).mean(0)
        gate.set_loss((f * p).sum() * gate.tot_expert)
        return idx, score
    gate.forward = with_loss


def noisy_load_in_evaluation(gate):
    """Noisy gate in evaluation: fmoec's load is the routed tokens per expert; FastMoE's gate
    divides by its noise's zero deviation (0 / 0 where a logit is its own threshold), which
    torch's Normal refuses (argument validation, on since torch 1.8). Adapted: without the
    validation FastMoE's load is the routed count too (torch.where picks the finite side)."""
    forward = gate.forward

    def unvalidated(inp, *args, **kwargs):
        if gate.training:
            return forward(inp, *args, **kwargs)
        validate = torch.distributions.Distribution._validate_args
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            return forward(inp, *args, **kwargs)
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)
    gate.forward = unvalidated


def noisy_index_per_token(gate):
    """Noisy gate: FastMoE's NoisyGate returns a flat index [T * k], which its own FMoE layer
    takes for k tokens per row (and fails on); fmoec routes [T, k]."""
    forward = gate.forward

    def per_token(inp):
        idx, score = forward(inp)
        return idx.view(-1, gate.top_k), score
    gate.forward = per_token


# ---------------------------------------------------------------------------------------------
# Running FastMoE's layer like the runtime ran its own.
# ---------------------------------------------------------------------------------------------
def _recording(gate):
    """Keeps what the gate returns (the routing FMoE's layer uses)."""
    seen = []
    forward = gate.forward

    def record(inp, *args, **kwargs):
        out = forward(inp, *args, **kwargs)
        seen.append(out)
        return out
    gate.forward = record
    return seen


def _draw_patches(config, draws, train, adapt=True):
    """FastMoE's gates draw from torch.randn_like (noisy), torch.rand (gshard's random routing,
    also in evaluation) and torch.rand_like (switch): they get the runtime's draws."""
    stack = contextlib.ExitStack()
    if config['gate'] == 'noisy' and draws is not None:
        stack.enter_context(_patched(torch, 'randn_like', _given(draws)))
    if config['gate'] == 'gshard' and draws is not None:
        if not train and adapt:
            draws = gshard_no_random_routing_in_evaluation(config)
        stack.enter_context(_patched(torch, 'rand', _given(draws)))
    return stack


def gshard_no_random_routing_in_evaluation(config):
    """Randomness in evaluation: fmoec's GShard routes no token away in evaluation; FastMoE's
    routes randomly in eval() too. Adapted: its draws are 0 there, so `2 * p2 < u` never holds."""
    return torch.zeros(config['tokens'])


def run(config, tensors, adapt=True, train_only=False):
    """FastMoE's layer in training (objective sum(out * w_out) + weight * its gate loss) and in
    evaluation, with the adapters (`adapt`) or without."""
    fmoe = _load()
    layer = build(config, tensors)
    gate = layer.gate
    draws = tensors.get('draws')
    if adapt:
        if config['gate'] == 'switch':
            switch_jitter_on_the_gate_input(gate, draws, config)
        if config['gate'] == 'gshard':
            gshard_capacity_after_random_routing(gate, config, fmoe)
        if config['gate'] == 'naive':
            naive_slot_balance_loss(gate)
        if config['gate'] == 'noisy':
            noisy_load_in_evaluation(gate)
            noisy_index_per_token(gate)
    seen = _recording(gate)
    p = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
    x = tensors['x'].clone().requires_grad_(True)
    shared = {k: v.clone().requires_grad_(True) for k, v in p.items() if k.startswith('shared.')}
    layer.train()
    with _draw_patches(config, draws, True):
        y = layer(x) + _shared(config, shared, x)
    loss = gate.get_loss(clear=False)
    loss = torch.zeros(()) if loss is None else loss.reshape(())
    ((y * tensors['w_out']).sum() + config['balance_loss'] * loss).backward()
    idx, score = seen[-1]
    out = {'train.out': y, 'train.x_grad': x.grad, 'train.balance_loss': loss,
           'train.expert': idx.view(config['tokens'], -1), 'train.weight': score.reshape(config['tokens'], -1)}
    out.update(_grads(config, layer, shared))
    if train_only:
        return out
    layer.eval()
    with torch.no_grad(), _draw_patches(config, draws, False, adapt):
        y = layer(tensors['x']) + _shared(config, p, tensors['x'])
    loss = gate.get_loss(clear=False)
    idx, score = seen[-1]
    out.update({'eval.out': y, 'eval.balance_loss': torch.zeros(()) if loss is None else loss.reshape(()),
                'eval.expert': idx.view(config['tokens'], -1),
                'eval.weight': score.reshape(config['tokens'], -1)})
    return out


def _grads(config, layer, shared, experts=None):
    """FastMoE's gradients under the runtime's names and layouts."""
    gate = layer.gate
    out = {}
    if config['gate'] == 'noisy':
        out['train.grad.gate.weight'] = gate.w_gate.grad
        out['train.grad.gate.noise'] = gate.w_noise.grad
    else:
        out['train.grad.gate.weight'] = gate.gate.weight.grad.t()
        if config['bias']:
            out['train.grad.gate.bias'] = gate.gate.bias.grad
    exs = list(layer.experts)
    stack = lambda f: torch.stack([f(ex) for ex in exs])
    out['train.grad.experts.w1'] = stack(lambda ex: ex.htoh4.weight.grad[0].t())
    out['train.grad.experts.w2'] = stack(lambda ex: ex.h4toh.weight.grad[0].t())
    if config['act'] == 'swiglu':
        out['train.grad.experts.w3'] = stack(lambda ex: ex.up.weight.grad[0].t())
    if config['bias']:
        out['train.grad.experts.b1'] = stack(lambda ex: ex.htoh4.bias.grad[0])
        out['train.grad.experts.b2'] = stack(lambda ex: ex.h4toh.bias.grad[0])
    for name, t in shared.items():
        out['train.grad.' + name] = t.grad
    return out


def check(config, want, compare):
    """FastMoE's layer, adapted, gives fmoec run's results; without the adapters it differs
    where the case can tell."""
    gate = config['gate']
    got = run(config, want)
    # SWIPE on one process: training is compared on as many processes as experts
    # (check_swipe_on_workers); here FastMoE's one worker moves nothing (plain top-k)
    prefixes = ('eval.',) if gate == 'swipe' else ('train.', 'eval.')
    compare(got, want, config, keys=[k for k in want if k.startswith(prefixes)])
    if gate == 'swipe':
        assert torch.equal(got['train.expert'], want['eval.expert'])
        assert not torch.equal(got['train.expert'], want['train.expert'])
    if gate in ('switch', 'gshard', 'naive', 'noisy'):
        try:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                plain = run(config, want, adapt=False)
        except IndexError:
            # FastMoE's FMoE reads the noisy gate's flat [T * k] index as T * k tokens
            assert gate == 'noisy', config['name']
            plain = None
        if gate == 'naive':
            assert float(plain['train.balance_loss'].detach()) == 0.0 and float(want['train.balance_loss']) > 0
        elif gate == 'noisy':
            assert plain is None, 'FastMoE\'s noisy layer routed its flat index'
        elif gate == 'gshard':
            assert not torch.equal(plain['train.expert'], want['train.expert']), \
                'FastMoE\'s capacity dropped the same slots'
            # with the runtime's draws in evaluation FastMoE routes second choices away
            assert not torch.equal(plain['eval.expert'], want['eval.expert'])
        elif gate == 'switch':
            # FastMoE's own noise (its generator's, on the logits) weights the tokens otherwise
            assert (plain['train.weight'] - want['train.weight']).abs().max() > 1e-3, \
                'FastMoE\'s logit noise changed nothing'
    if gate == 'gshard':
        _check_gshard_loss_over_workers(config, want)


def _check_gshard_loss_over_workers(config, want):
    """GShard's loss: FastMoE scales mean(c_e * m_e) by the square of one worker's experts,
    fmoec by the square of the layer's: FastMoE's gate on E workers of one expert each (one
    process: the gate itself does not communicate) gives fmoec's loss / E^2."""
    fmoe = _load()
    e = config['experts']
    gate = fmoe.gates.GShardGate(config['width'], 1, e, topk=2, capacity=tuple(config['capacity']),
                                 random_routing=config['random_routing'], gate_bias=config['bias'])
    p = {k[len('param.'):]: v for k, v in want.items() if k.startswith('param.')}
    with torch.no_grad():
        gate.gate.weight.copy_(p['gate.weight'].t())
        if config['bias']:
            gate.gate.bias.copy_(p['gate.bias'])
    gate.train()
    with _draw_patches(config, want.get('draws'), True):
        gate(want['x'])
    got = float(gate.get_loss().detach()) * e * e
    assert abs(got - float(want['train.balance_loss'])) <= 1e-5 * abs(float(want['train.balance_loss']))


# ---------------------------------------------------------------------------------------------
# SWIPE with one expert per worker: FastMoE on as many gloo processes as experts.
# ---------------------------------------------------------------------------------------------
def _swipe_worker(rank, world, cases):
    import fmoe_cuda  # noqa: F401 (after _load)
    _load()
    results = []
    for config, tensors in cases:
        t = config['tokens'] // world
        rows = slice(rank * t, (rank + 1) * t)
        local = dict(tensors)
        layer = build(config, tensors, experts=[rank], world_size=world, group=dist.group.WORLD)
        seen = _recording(layer.gate)
        p = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
        shared = {k: v.clone().requires_grad_(True) for k, v in p.items() if k.startswith('shared.')}
        x = local['x'][rows].clone().requires_grad_(True)
        layer.train()
        y = layer(x) + _shared(config, shared, x)
        (y * local['w_out'][rows]).sum().backward()
        idx, _ = seen[-1]
        out = {'train.out': y.detach(), 'train.x_grad': x.grad, 'train.expert': idx.view(t, -1)}
        out.update(_grads(config, layer, shared))
        results.append(out)
    return results


def check_swipe_on_workers(cases, compare):
    import workers
    _load()
    world = cases[0][0]['experts']
    per_rank = workers.run(world, _swipe_worker, cases)
    for i, (config, want) in enumerate(cases):
        ranks = [r[i] for r in per_rank]
        got = {k: torch.cat([r[k] for r in ranks], 0)
               for k in ('train.out', 'train.x_grad', 'train.expert')}
        for key in ranks[0]:
            if key.startswith('train.grad.experts.'):
                got[key] = torch.cat([r[key] for r in ranks], 0)      # expert r on rank r
            elif key.startswith('train.grad.'):
                got[key] = sum(r[key] for r in ranks)                 # replicated: summed
        compare(got, want, config, keys=sorted(got))
