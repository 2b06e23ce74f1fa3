"""Gates and the MoE layer on one rank against hand-computed values and a per-token reference."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import fmoec_moe as m
import workers

# Logits = x (identity gate weight, zero bias): top-2 per token is easy to read off.
X = torch.tensor([[4.0, 3.0, 0.0, 0.0],
                  [4.0, 3.0, 0.0, 0.0],
                  [4.0, 0.0, 3.0, 0.0],
                  [0.0, 0.0, 4.0, 3.0]])


def _identity_gate(gate):
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(4))
        gate.gate.bias.zero_()
    return gate


def _softmax_rows(rows):
    out = []
    for r in rows:
        e = [math.exp(v) for v in r]
        out.append([v / sum(e) for v in e])
    return out


def test_gshard_capacity_and_loss_by_hand():
    gate = _identity_gate(m.GShardGate(4, 4, 2, m.Topology(), capacity=(0.5, 0.5), random_routing=False))
    idx, score, loss = gate(X)
    # capacity = ceil(0.5 * 2 * 4 / 4) = 1 per expert, granted in slot-major order: every first
    # choice (experts 0, 0, 0, 2) before any second choice (1, 1, 2, 3)
    assert idx.tolist() == [[0, 1], [-1, -1], [-1, -1], [2, 3]]
    assert score[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])
    probs = _softmax_rows(X.tolist())
    m_e = [sum(p[e] for p in probs) / 4 for e in range(4)]
    c_e = [3 / 4, 0.0, 1 / 4, 0.0]          # top-1 experts: 0, 0, 0, 2
    expected = sum(c * mm for c, mm in zip(c_e, m_e)) / 4 * 16
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_gshard_random_routing_drops_weak_second_choices():
    gate = _identity_gate(m.GShardGate(4, 4, 2, m.Topology(), capacity=(4.0, 4.0), random_routing=True))
    torch.manual_seed(3)
    idx, score, _ = gate(X)
    torch.manual_seed(3)
    u = torch.rand(4)
    expected_drop = (2 * score[:, 1] < u).tolist()
    assert [i == -1 for i in idx[:, 1].tolist()] == expected_drop
    gate.eval()
    assert (gate(X)[0] >= 0).all()           # no random routing in evaluation


def test_switch_capacity_and_loss_by_hand():
    gate = _identity_gate(m.SwitchGate(4, 4, 1, m.Topology(), capacity=(1.0, 1.0), jitter=0.0))
    idx, score, loss = gate(X)
    # capacity = ceil(1.0 * 4 / 4) = 1 per expert; top-1 experts are 0, 0, 0, 2
    assert idx.reshape(-1).tolist() == [0, -1, -1, 2]
    probs = _softmax_rows(X.tolist())
    assert score.reshape(-1).tolist() == pytest.approx([max(p) for p in probs], rel=1e-6)
    frac = [0.5, 0.0, 0.5, 0.0]
    p_e = [sum(p[e] for p in probs) / 2 for e in range(4)]
    assert float(loss.detach()) == pytest.approx(sum(f * p for f, p in zip(frac, p_e)) * 4, rel=1e-6)


def test_noisy_gate_loss_by_hand():
    gate = m.NoisyGate(4, 4, 2, m.Topology())
    with torch.no_grad():
        gate.w_gate.copy_(torch.eye(4))
        gate.w_noise.zero_()
    torch.manual_seed(11)
    idx, score, loss = gate(X)
    torch.manual_seed(11)
    noise = torch.randn(4, 4).tolist()
    std = math.log1p(math.exp(0.0)) + 1e-2
    clean = X.tolist()
    noisy = [[c + n * std for c, n in zip(cr, nr)] for cr, nr in zip(clean, noise)]
    importance, load = [0.0] * 4, [0.0] * 4
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    for t in range(4):
        order = sorted(range(4), key=lambda e: -noisy[t][e])
        top = order[:2]
        assert sorted(idx[t].tolist()) == sorted(top)
        ex = [math.exp(noisy[t][e]) for e in top]
        for e, v in zip(top, ex):
            importance[e] += v / sum(ex)
        thr_in, thr_out = noisy[t][order[2]], noisy[t][order[1]]
        for e in range(4):
            thr = thr_in if noisy[t][e] > thr_in else thr_out
            load[e] += cdf((clean[t][e] - thr) / std)

    def cv2(v):
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
        return var / (mean ** 2 + 1e-10)
    assert float(loss.detach()) == pytest.approx(cv2(importance) + cv2(load), rel=1e-5)


def test_swipe_moves_overflow_to_experts_with_room():
    # 4 tokens, 2 experts, top-1: each expert takes ceil(4 * 1 / 2) = 2; all prefer expert 0,
    # so the first two stay there and the other two move to expert 1, in token order
    gate = m.SwipeGate(2, 2, 1, m.Topology())
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(2))
        gate.gate.bias.zero_()
    x = torch.tensor([[3.0, 1.0], [2.0, 0.0], [4.0, 1.0], [1.0, 0.5]])
    idx, score, loss = gate(x)
    assert idx.reshape(-1).tolist() == [0, 0, 1, 1]
    # the weights of the moved tokens are their logits' softmax at the new expert (k = 1: 1.0)
    assert score.reshape(-1).tolist() == [1.0, 1.0, 1.0, 1.0] and float(loss) == 0.0
    gate.eval()
    assert gate(x)[0].reshape(-1).tolist() == [0, 0, 0, 0]   # no re-balancing in evaluation


def test_swipe_on_expert_ranks_routes_each_ranks_tokens_on_their_own():
    # 2 ranks, one expert each, both ranks' tokens prefer expert 0: each rank routes its two
    # tokens as one rank would (expert 0 takes ceil(2 / 2) = 1 of them), with no collective
    r0, r1 = workers.run(2, workers.swipe_two_ranks)
    assert r0['idx'].reshape(-1).tolist() == [0, 1]
    assert r1['idx'].reshape(-1).tolist() == [0, 1]


@pytest.mark.parametrize('gate', ['naive', 'noisy', 'gshard', 'switch', 'swipe'])
@pytest.mark.parametrize('act', ['gelu', 'swiglu'])
def test_moe_output_equals_per_token_reference(gate, act):
    spec = workers.spec_for(gate)
    spec.update(act=act, capacity=(0.6, 0.6), jitter=0.1, random_routing=True)
    layer = m.MoELayer(spec, 8, 4, m.Topology(), layer_index=2, seed=3)
    with torch.no_grad():                    # non-zero biases, so they are checked too
        layer.experts.htoh4_bias.normal_()
        layer.experts.h4toh_bias.normal_()
    x = torch.randn(10, 2, 8)
    torch.manual_seed(5)
    y, bias = layer(x)
    torch.manual_seed(5)
    idx, score, _ = layer.gate(x.reshape(-1, 8))
    ex = layer.experts
    ref = torch.zeros(20, 8)
    for t, row in enumerate(x.reshape(-1, 8)):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            h = ex.htoh4_weight[e] @ row + ex.htoh4_bias[e]
            h = F.gelu(h) if act == 'gelu' else F.silu(h) * (ex.up_proj_weight[e] @ row)
            ref[t] += score[t, k] * (ex.h4toh_weight[e] @ h + ex.h4toh_bias[e])
    torch.testing.assert_close(y.reshape(-1, 8), ref, rtol=1e-5, atol=1e-6)
    assert bias.shape == (8,) and not bias.any()
    if gate in ('gshard', 'switch'):
        assert (idx < 0).any()               # the capacity really dropped tokens


def test_balance_loss_gradient_is_added_to_the_training_loss():
    spec = workers.spec_for('gshard')
    spec.update(balance_loss=0.5, random_routing=False, capacity=(4.0, 4.0))
    x = torch.randn(12, 1, 8)
    w = torch.randn(8)
    grads = []
    for attach in (True, False):
        layer = m.MoELayer(spec, 8, 4, m.Topology(), layer_index=1, seed=9)
        losses = []
        if not attach:
            layer.balance_weight = 0.0
            forward = layer.gate.forward
            layer.gate.forward = lambda inp: (lambda r: (losses.append(r[2]), r)[1])(forward(inp))
        y, _ = layer(x)
        objective = (y * w).sum()
        if not attach:
            objective = objective + 0.5 * losses[0]
        objective.backward()
        grads.append(layer.gate.gate.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_arguments_are_registered_and_read_under_the_same_names():
    parser = m.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    for _, dest, _ in m._ARGUMENTS:
        assert hasattr(args, dest)
    assert args.fmoefy is True and args.fmoe_layers == sorted(m._FMOEC_LAYERS)
    args = parser.parse_args(['--fmoe-top-k', '1', '--fmoe-balance-strategy', 'switch',
                              '--fmoe-capacity', '1.0', '2.0', '--no-fmoefy'])
    spec = m._layer_spec(sorted(m._FMOEC_LAYERS)[0], args)
    assert (spec['top_k'], spec['gate'], spec['capacity'], args.fmoefy) == (1, 'switch', (1.0, 2.0), False)


def test_gate_table_is_fmoecs_one_definition():
    # the gates of `fmoec::gates`, with std.gates' defaults
    assert list(m._GATES) == ['naive', 'noisy', 'gshard', 'switch', 'swipe']
    assert {n: d['top_k'] for n, d in m._GATES.items()} == \
        {'naive': None, 'noisy': None, 'gshard': 2, 'switch': 1, 'swipe': None}
    assert m._GATES['gshard']['capacity'] == (1.2, 2.4) and m._GATES['gshard']['random_routing']
    assert m._GATES['switch']['jitter'] == 0.1
    for name in m._GATES:
        assert m._GATE_CLASSES[name].NAME == name
    # an unknown gate or a top_k the gate does not route is an error, never a fallback
    with pytest.raises(ValueError, match='no gate `mixtral`'):
        m._gate_definition('mixtral')
    with pytest.raises(ValueError, match='routes to 2 expert'):
        m.GShardGate(4, 4, 1, m.Topology())
    # a gate's parameters follow the model's biases
    assert m.NaiveGate(4, 4, 2, m.Topology(), bias=False).gate.bias is None
    assert m.SwitchGate(4, 4, 1, m.Topology()).gate.bias is not None   # this model has biases


def test_another_gate_on_the_command_line_takes_its_own_defaults():
    parser = m.add_arguments(argparse.ArgumentParser())
    first = sorted(m._FMOEC_LAYERS)[0]
    other = 'switch' if m._FMOEC_LAYERS[first]['gate'] != 'switch' else 'gshard'
    top_k = m._GATES[other]['top_k']
    args = parser.parse_args(['--fmoe-balance-strategy', other, '--fmoe-top-k', str(top_k)])
    spec = m._layer_spec(first, args)
    for key in ('capacity', 'jitter', 'random_routing'):
        assert spec[key] == m._GATES[other][key], key
    args = parser.parse_args(['--fmoe-balance-strategy', other, '--fmoe-top-k', str(top_k + 1)])
    with pytest.raises(ValueError, match='routes each token to {} expert'.format(top_k)):
        m._layer_spec(first, args)


def test_expert_checkpoint_names():
    assert m.expert_checkpoint_name('ck/iter_0000010/mp_rank_01_002/model_optim_rng.pt', 3) == \
        'ck/iter_0000010/mp_rank_01_002_dp_rank_0003/model_optim_rng.pt'


def test_clip_norms_by_hand_and_zero_max_norm_leaves_gradients():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, -4.0])
    b.grad = torch.tensor([12.0])
    b.dp_comm = 'none'                       # an expert gradient: still counted once on one rank
    topo = m.Topology()
    assert m.clip_grad_norm_fp32([a, b], 0.0, 2, topology=topo) == pytest.approx(13.0)
    assert a.grad.tolist() == [3.0, -4.0]    # --clip-grad 0: no clipping
    assert m.clip_grad_norm_fp32([a, b], float('inf'), float('inf'), topology=topo) == pytest.approx(12.0)
    assert m.clip_grad_norm_fp32([a, b], 6.5, 2, topology=topo) == pytest.approx(13.0)
    assert a.grad.tolist() == pytest.approx([1.5, -2.0], rel=1e-5)
