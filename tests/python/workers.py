"""Multi-process workers for the tests: torch.multiprocessing + gloo, results through files."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D_MODEL = 8
TOKENS = 24          # all ranks together; each rank takes TOKENS / world
EXPERTS = 4
HIDDEN = 12


def spec_for(gate):
    top_k = 1 if gate == 'switch' else 2
    return dict(experts=EXPERTS, top_k=top_k, gate=gate, hidden=HIDDEN, act='gelu',
                capacity=(4.0, 4.0), balance_loss=0.0, jitter=0.0, random_routing=False)


def run(world, fn, *args):
    """Run fn(rank, world, *args) in `world` processes; return the list of their results."""
    folder = tempfile.mkdtemp()
    mp.spawn(_entry, args=(world, folder, fn, args), nprocs=world, join=True)
    return [torch.load(os.path.join(folder, 'r{}.pt'.format(r))) for r in range(world)]


def _entry(rank, world, folder, fn, args):
    dist.init_process_group('gloo', init_method='file://' + os.path.join(folder, 'rdv'),
                            rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(folder, 'r{}.pt'.format(rank)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(TOKENS, 1, D_MODEL, generator=g)
    w = torch.randn(D_MODEL, generator=g)
    return x, w


def expert_parallel_step(rank, world, gates, tensor, expert_group_size=0):
    """Each rank: its share of the tokens through every gate's MoE layer; forward, backward,
    expert-aware reduction, clipping. `tensor` ranks split each expert's hidden dimension;
    `expert_group_size` > 0 splits the data ranks into expert groups of that size."""
    import fmoec_moe as m
    group = dist.group.WORLD
    experts_ranks = world // tensor
    if expert_group_size:
        s = expert_group_size
        groups = [dist.new_group(list(range(c * s, (c + 1) * s))) for c in range(world // s)]
        replicas = [dist.new_group(list(range(j, world, s))) for j in range(s)]
        topo = m.Topology(expert_group=groups[rank // s], expert_rank=rank % s, expert_size=s,
                          expert_dp_group=replicas[rank % s], expert_dp_size=world // s,
                          data_group=group, data_size=world, gate_group=group)
        experts_ranks = s
        lo, hi = rank * TOKENS // world, (rank + 1) * TOKENS // world
    elif tensor > 1:
        topo = m.Topology(tensor_group=group, tensor_rank=rank, tensor_size=tensor,
                          data_group=None, data_size=1, gate_group=group)
        lo, hi = 0, TOKENS
    else:
        topo = m.Topology(expert_group=group if world > 1 else None, expert_rank=rank, expert_size=world,
                          data_group=group if world > 1 else None, data_size=world, gate_group=group)
        lo, hi = rank * TOKENS // world, (rank + 1) * TOKENS // world
    x_all, w = inputs()
    results = {}
    for gate in gates:
        spec = spec_for(gate)
        # shared experts: replicated over the expert ranks, sliced over the tensor ranks
        spec['shared'] = dict(count=2, hidden=6, act='gelu')
        layer = m.MoELayer(spec, D_MODEL, EXPERTS // experts_ranks, topo, layer_index=1, seed=99)
        if gate == 'noisy':
            layer.eval()
        x = x_all[lo:hi].clone().requires_grad_(True)
        y, _ = layer(x)
        loss = (y * w).sum(-1).mean()
        loss.backward()
        m._allreduce_by_kind(list(layer.parameters()), topo)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        norm2 = m.clip_grad_norm_fp32(list(layer.parameters()), 1e9, 2, topology=topo,
                                      model_parallel_group=group if tensor > 1 else None)
        norm_inf = m.clip_grad_norm_fp32(list(layer.parameters()), 1e9, float('inf'), topology=topo,
                                         model_parallel_group=group if tensor > 1 else None)
        clipped = m.clip_grad_norm_fp32(list(layer.parameters()), 0.01, 2, topology=topo,
                                        model_parallel_group=group if tensor > 1 else None)
        results[gate] = dict(y=y.detach(), x_grad=x.grad.clone(), grads=grads, norm2=norm2,
                             norm_inf=norm_inf, clipped_norm=clipped,
                             clipped_grads={n: p.grad.clone() for n, p in layer.named_parameters()})
    return results


def swipe_two_ranks(rank, world):
    """Every token of both ranks prefers expert 0 (on rank 0)."""
    import fmoec_moe as m
    topo = m.Topology(expert_group=dist.group.WORLD, expert_rank=rank, expert_size=world,
                      data_group=dist.group.WORLD, data_size=world, gate_group=dist.group.WORLD)
    gate = m.SwipeGate(2, 2, 1, topo)
    with torch.no_grad():
        gate.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        gate.gate.bias.zero_()
    x = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    idx, score = gate(x)[:2]
    return dict(idx=idx, score=score)


def checkpoint_round_trip(rank, world, folder):
    """Train a step, save this rank's expert shard, scramble, load: identical state."""
    import fmoec_moe as m
    topo = m.Topology(expert_group=dist.group.WORLD, expert_rank=rank, expert_size=world,
                      data_group=dist.group.WORLD, data_size=world, gate_group=dist.group.WORLD)
    layer = m.MoELayer(spec_for('naive'), D_MODEL, EXPERTS // world, topo, layer_index=1, seed=5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, w = inputs()
    for _ in range(2):
        opt.zero_grad()
        y, _ = layer(x[rank::world])
        (y * w).sum(-1).mean().backward()
        m._allreduce_by_kind(list(layer.parameters()), topo)
        opt.step()
    megatron_name = os.path.join(folder, 'iter_0000002', 'mp_rank_00', 'model_optim_rng.pt')
    name = m.expert_checkpoint_name(megatron_name, rank)
    os.makedirs(os.path.dirname(name), exist_ok=True)
    torch.save({'iteration': 2, 'experts': m.expert_state(layer, opt)}, name)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in layer.named_parameters()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    for p in layer.parameters():
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                v.add_(3.0)
    m.load_expert_state(layer, opt, torch.load(name)['experts'])
    experts_equal = all(torch.equal(p, params[n]) for n, p in layer.named_parameters() if n.startswith('experts.'))
    state_equal = all(torch.equal(v, state[n][k]) for n, p in layer.named_parameters() if n.startswith('experts.')
                      for k, v in opt.state[p].items())
    return dict(name=name, experts_equal=experts_equal, state_equal=state_equal,
                experts=[n for n, p in layer.named_parameters() if m._is_expert(p)],
                weight=layer.experts.htoh4_weight.detach().clone())


def found_inf_agreement(rank, world, overflow_rank):
    """Megatron's fp16 overflow flag after its model-parallel all-reduce: set on one data rank
    only (an inf in that rank's expert gradients). Returns the flag after agree_found_inf."""
    import fmoec_moe as m
    group = dist.group.WORLD
    m.set_topology(m.Topology(expert_group=group, expert_rank=rank, expert_size=world,
                              data_group=group, data_size=world, gate_group=group))
    found_inf = torch.tensor([1.0 if rank == overflow_rank else 0.0])
    m.agree_found_inf(found_inf)
    return {'found_inf': float(found_inf.item())}


def main_grad_reduction(rank, world):
    """One backward on 2 expert ranks, reduced once from `param.grad` (Megatron-LM v2.2's local
    DDP) and once from `param.main_grad` (v2.5 and later): the same gradients."""
    import fmoec_moe as m
    group = dist.group.WORLD
    topo = m.Topology(expert_group=group, expert_rank=rank, expert_size=world,
                      data_group=group, data_size=world, gate_group=group)
    layer = m.MoELayer(spec_for('gshard'), D_MODEL, EXPERTS // world, topo, layer_index=1, seed=3)
    x, w = inputs()
    y, _ = layer(x[rank::world])
    (y * w).sum(-1).mean().backward()
    params = list(layer.parameters())
    for p in params:
        p.main_grad = p.grad.detach().clone().float()
    m._allreduce_by_kind(params, topo)
    by_grad = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for p in params:
        p.grad = None
    m._allreduce_by_kind(params, topo, main_grad=True)
    same = all(torch.equal(p.main_grad, by_grad[n]) for n, p in layer.named_parameters())
    return {'same': same, 'grads_untouched': all(p.grad is None for p in params)}
