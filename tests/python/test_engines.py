"""One MoE layer, three engines: `fmoec run`'s (Rust), the emitted module's and FastMoE's own.

tests/compiler/emit_python.rs (`one_layer_is_the_same_in_the_runtime_the_emitted_module_and_fastmoe`)
runs the runtime's layer for every gate and expert kind and writes each case to
FMOEC_ENGINE_CASES:
  case-NNN.json         the layer: gate, act, bias, shared experts, experts, top_k, width,
                        tokens, hidden, capacity, jitter, random_routing, balance_loss
  case-NNN.safetensors  param.NAME (the runtime's parameters: gate.weight [d, E], gate.bias,
                        gate.noise, experts.w1 [E, d, h], experts.w3, experts.w2 [E, h, d],
                        experts.b1, experts.b2, shared.*), x [T, d], w_out [T, d] and the draws
                        the runtime's gate took in training (`draws`, if any); its results in
                        training (objective sum(out * w_out) + balance_loss * weight):
                        train.out, train.x_grad, train.grad.NAME, train.balance_loss,
                        train.expert, train.weight; and in evaluation: eval.out,
                        eval.balance_loss, eval.expert, eval.weight.

Here the emitted module's layer, given the same weights, inputs and draws, must give the same:
fp32 within a relative 1e-5 (of each tensor's largest magnitude), routing exactly. With
FMOEC_FASTMOE naming a FastMoE checkout (its Python runs on the emulation of its compiled
extension, fastmoe_leg.py), FastMoE's layer must too, through the deliberate differences that
README.md lists ("Where fmoec differs from FastMoE on purpose"): each is one adapter in
fastmoe_leg.py, and the test shows that without it FastMoE differs.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import fmoec_moe as m

CASES = os.environ.get('FMOEC_ENGINE_CASES')
FASTMOE = os.environ.get('FMOEC_FASTMOE')


def _case_names():
    if not CASES:
        return ['none']
    return sorted(f[:-len('.json')] for f in os.listdir(CASES) if f.endswith('.json'))


def load_case(stem):
    with open(os.path.join(CASES, stem + '.json')) as f:
        config = json.load(f)
    return config, load_file(os.path.join(CASES, stem + '.safetensors'))


def assert_close(got, want, what):
    """Within a relative 1e-5 of the reference's largest magnitude (exactly zero stays zero)."""
    got, want = got.detach().double().reshape(want.shape), want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if scale == 0.0:
        assert err <= 1e-12, '{}: expected zeros, off by {:.3e}'.format(what, err)
    else:
        assert err / scale < 1e-5, '{}: relative difference {:.3e}'.format(what, err / scale)


# The runtime's parameters under the emitted module's names and layouts (runtime [in, out],
# module [out, in]; shared experts are the module's Experts of one).
def _to_module(name, t, gate):
    if name == 'gate.weight':
        return ('gate.w_gate', t) if gate == 'noisy' else ('gate.gate.weight', t.t())
    if name == 'gate.noise':
        return 'gate.w_noise', t
    if name == 'gate.bias':
        return 'gate.gate.bias', t
    part, key = name.split('.')
    one = part == 'shared'
    if key in ('w1', 'w3', 'w2'):
        t = t.unsqueeze(0) if one else t
        t = t.transpose(1, 2)
    elif one:
        t = t.unsqueeze(0)
    module = {'w1': 'htoh4_weight', 'w3': 'up_proj_weight', 'w2': 'h4toh_weight',
              'b1': 'htoh4_bias', 'b2': 'h4toh_bias'}[key]
    return '{}.{}'.format(part, module), t


def _spec(config):
    capacity = config['capacity']
    return dict(experts=config['experts'], top_k=config['top_k'], gate=config['gate'],
                hidden=config['hidden'], act=config['act'],
                capacity=tuple(capacity) if capacity else None,
                balance_loss=config['balance_loss'], jitter=config['jitter'],
                random_routing=config['random_routing'], shared=config['shared'])


def _give_draws(gate, draws):
    """The gate takes the runtime's draws instead of its own."""
    def given(shape, like):
        assert tuple(shape) == tuple(draws.shape), (shape, draws.shape)
        return draws.to(like.dtype)
    gate._uniform = given
    gate._normal = given


def emitted_layer(config, tensors):
    layer = m.MoELayer(_spec(config), config['width'], config['experts'], m.Topology(),
                       bias=config['bias'])
    params = dict(layer.named_parameters())
    names = [k[len('param.'):] for k in tensors if k.startswith('param.')]
    assert len(names) == len(params), (sorted(names), sorted(params))
    with torch.no_grad():
        for name in names:
            target, value = _to_module(name, tensors['param.' + name], config['gate'])
            params[target].copy_(value)
    if 'draws' in tensors:
        _give_draws(layer.gate, tensors['draws'])
    return layer


def run_emitted(config, tensors):
    """The emitted module's layer: training (forward, backward of the same objective) and
    evaluation, each with its routing."""
    layer = emitted_layer(config, tensors)
    t, d = config['tokens'], config['width']
    x = tensors['x'].clone().requires_grad_(True)
    layer.train()
    y, _ = layer(x.view(t, 1, d))
    # the module attaches `balance_loss * weight`'s gradient itself (_AttachBalanceLoss)
    (y.view(t, d) * tensors['w_out']).sum().backward()
    out = {'train.out': y.view(t, d), 'train.x_grad': x.grad, 'train.balance_loss': layer.last_loss}
    params = dict(layer.named_parameters())
    for key in tensors:
        if key.startswith('param.'):
            name = key[len('param.'):]
            target, _ = _to_module(name, tensors[key], config['gate'])
            # the gradient back in the runtime's layout
            grad = params[target].grad
            out['train.grad.' + name] = _from_module(name, grad, config['gate'])
    with torch.no_grad():
        out['train.expert'], out['train.weight'], _ = layer.gate(tensors['x'])
        layer.eval()
        y, _ = layer(tensors['x'].view(t, 1, d))
        out['eval.out'] = y.view(t, d)
        out['eval.balance_loss'] = layer.last_loss
        out['eval.expert'], out['eval.weight'], _ = layer.gate(tensors['x'])
    return out, layer


def _from_module(name, t, gate):
    if name == 'gate.weight':
        return t if gate == 'noisy' else t.t()
    if name in ('gate.noise', 'gate.bias'):
        return t
    part, key = name.split('.')
    if key in ('w1', 'w3', 'w2'):
        t = t.transpose(1, 2)
    return t[0] if part == 'shared' else t


ROUTING = ('train.expert', 'eval.expert')


def compare(got, want, config, keys=None):
    for key in keys or sorted(got):
        if key in ROUTING:
            assert torch.equal(got[key].long(), want[key].long()), \
                '{}: {} routes differently:\n{}\n{}'.format(config['name'], key, got[key].tolist(),
                                                            want[key].tolist())
        else:
            assert_close(got[key], want[key], '{}: {}'.format(config['name'], key))


def _exercised(config, want):
    """The case tests what its gate does: drops, random routing, moved tokens, noise."""
    gate, expert = config['gate'], want['train.expert']
    if gate in ('gshard', 'switch'):
        assert (expert < 0).any(), 'the capacity dropped nothing'
    if gate == 'gshard':
        routed_away = (2 * want['train.weight'][:, 1] < want['draws']).sum()
        assert routed_away > 0, 'random routing dropped nothing'
        assert (expert < 0).sum() > routed_away, 'the capacity dropped nothing more'
    if gate in ('swipe', 'noisy'):
        assert not torch.equal(expert, want['eval.expert']), '{} routed as in evaluation'.format(gate)


@pytest.mark.skipif(not CASES, reason='FMOEC_ENGINE_CASES is written by tests/compiler/emit_python.rs')
@pytest.mark.parametrize('stem', _case_names())
def test_emitted_module_is_fmoec_run(stem):
    config, want = load_case(stem)
    got, layer = run_emitted(config, want)
    _exercised(config, want)
    compare(got, want, config)
    if config['gate'] == 'switch':
        # the jitter matters in this case: without it the scores (and mostly the routing) differ
        layer.train()
        layer.gate.jitter = 0.0
        with torch.no_grad():
            _, clean, _ = layer.gate(want['x'])
        assert (clean.reshape(-1) - want['train.weight'].reshape(-1)).abs().max() > 1e-3, \
            'the jitter changed nothing'


@pytest.mark.skipif(not (CASES and FASTMOE),
                    reason='FMOEC_FASTMOE names a FastMoE checkout (PyPI has no FastMoE package)')
@pytest.mark.parametrize('stem', _case_names())
def test_fastmoe_is_fmoec_run_but_for_the_listed_differences(stem):
    import fastmoe_leg
    config, want = load_case(stem)
    fastmoe_leg.check(config, want, compare)


@pytest.mark.skipif(not (CASES and FASTMOE),
                    reason='FMOEC_FASTMOE names a FastMoE checkout (PyPI has no FastMoE package)')
def test_fastmoe_swipe_with_one_expert_per_worker_is_fmoecs_swipe():
    """fmoec's SWIPE makes every expert a worker: FastMoE's own SwipeGate on as many processes
    as experts, one expert each, each with its share of the tokens in order, routes as fmoec's
    one layer does (gloo, the emulated extension's collectives)."""
    import fastmoe_leg
    stems = [s for s in _case_names() if load_case(s)[0]['gate'] == 'swipe']
    assert stems
    fastmoe_leg.check_swipe_on_workers([load_case(s) for s in stems], compare)
