"""2 and 4 expert ranks (and 2 tensor ranks) give what 1 rank gives: output, input and
parameter gradients, the 2-norm and inf-norm, and the clipped gradients; the layers have shared
experts (replicated over expert ranks, sliced over tensor ranks)."""
import pytest
import torch

import workers

# SWIPE is left out: it re-balances among the tokens one rank routes, so splitting a batch
# over ranks changes its routing (test_gates.py checks it on one and on two ranks).
GATES = ('naive', 'noisy', 'gshard', 'switch')


@pytest.fixture(scope='module')
def single():
    return workers.run(1, workers.expert_parallel_step, GATES, 1)[0]


def _full_expert(results, name, world, tensor, expert_group_size=0):
    """Stack the ranks' expert slices (and tensor slices of the shared experts) into the
    single-rank layout."""
    parts = [r[name] for r in results]
    if name.startswith('shared.'):
        if tensor == 1:
            # replicated over the expert ranks, reduced like any replicated parameter
            for p in parts:
                torch.testing.assert_close(p, parts[0])
            return parts[0]
        name = 'experts.' + name[len('shared.'):]
    if expert_group_size:
        # expert-data replicas hold the same experts with the same (reduced) values
        for i, p in enumerate(parts):
            torch.testing.assert_close(p, parts[i % expert_group_size])
        parts = parts[:expert_group_size]
    if tensor > 1:
        dim = {'experts.htoh4_weight': 1, 'experts.htoh4_bias': 1, 'experts.h4toh_weight': 2}.get(name)
        return parts[0] if dim is None else torch.cat(parts, dim)
    return torch.cat(parts, 0)


def _check(single, results, world, tensor, expert_group_size=0):
    for gate in GATES:
        ref = single[gate]
        ys = [r[gate]['y'] for r in results]
        y = ys[0] if tensor > 1 else torch.cat(ys, 0)
        torch.testing.assert_close(y, ref['y'], rtol=1e-5, atol=1e-6, msg=gate)
        scale = 1 if tensor > 1 else world
        xg = results[0][gate]['x_grad'] if tensor > 1 else torch.cat([r[gate]['x_grad'] for r in results], 0)
        torch.testing.assert_close(xg / scale, ref['x_grad'], rtol=1e-5, atol=1e-7, msg=gate)
        for key in ('grads', 'clipped_grads'):
            for name, g in ref[key].items():
                if name.startswith('gate.'):
                    for r in results:
                        torch.testing.assert_close(r[gate][key][name], g, rtol=1e-5, atol=1e-7,
                                                   msg='{} {}'.format(gate, name))
                else:
                    full = _full_expert([r[gate][key] for r in results], name, world, tensor,
                                        expert_group_size)
                    torch.testing.assert_close(full, g, rtol=1e-5, atol=1e-7, msg='{} {}'.format(gate, name))
        for key in ('norm2', 'norm_inf', 'clipped_norm'):
            for r in results:
                assert r[gate][key] == pytest.approx(ref[key], rel=1e-5), (gate, key)
        assert ref['clipped_norm'] > 0.01  # the clipping really scaled the gradients


@pytest.mark.parametrize('world', [2, 4])
def test_expert_ranks_match_one_rank(single, world):
    _check(single, workers.run(world, workers.expert_parallel_step, GATES, 1), world, 1)


def test_tensor_ranks_match_one_rank(single):
    _check(single, workers.run(2, workers.expert_parallel_step, GATES, 2), 2, 2)


def test_expert_sub_groups_with_replicated_experts_match_one_rank(single):
    """4 data ranks in 2 expert groups of 2: experts split within a group, replicated across."""
    _check(single, workers.run(4, workers.expert_parallel_step, GATES, 1, 2), 4, 1, 2)


def test_main_grad_reduction_equals_grad_reduction():
    # Megatron-LM v2.5 and later reduce `param.main_grad` (local_ddp); v2.2 `param.grad`
    for r in workers.run(2, workers.main_grad_reduction):
        assert r['same'] and r['grads_untouched']
