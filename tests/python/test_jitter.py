"""The Switch gate's jitter means the same in `fmoec run` and in the emitted module: the gate's
input times U(1 - eps, 1 + eps). tests/emit_python.rs routes a batch with the runtime's Switch
gate (libtorch, keyed draws) and writes the case to FMOEC_JITTER_CASE: the inputs, the gate's
weights, the very draws the runtime used, and its routing; this module's SwitchGate, given the
same weights and draws, must route alike."""
import json
import os

import pytest
import torch

import fmoec_moe as m

CASE = os.environ.get('FMOEC_JITTER_CASE')


@pytest.mark.skipif(not CASE, reason='FMOEC_JITTER_CASE is written by tests/emit_python.rs')
def test_switch_jitter_routes_like_fmoec_run():
    with open(CASE) as f:
        case = json.load(f)
    x = torch.tensor(case['x'])
    draws = torch.tensor(case['draws'])
    d, e = len(case['weight']), len(case['bias'])
    gate = m.SwitchGate(d, e, 1, m.Topology(), capacity=tuple(case['capacity']),
                        jitter=case['jitter'], bias=True)
    with torch.no_grad():
        gate.gate.weight.copy_(torch.tensor(case['weight']).t())   # runtime [d, E], Linear [E, d]
        gate.gate.bias.copy_(torch.tensor(case['bias']))
    gate._jitter_draws = lambda inp: draws
    gate.train()
    idx, score, loss = gate(x)
    assert idx.reshape(-1).tolist() == case['expert']
    torch.testing.assert_close(score.reshape(-1), torch.tensor(case['weight_out']), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, torch.tensor(case['balance_loss']), rtol=1e-5, atol=1e-6)
    # the case is one where the jitter matters: without it some token goes elsewhere
    gate.jitter = 0.0
    clean, _, _ = gate(x)
    assert clean.reshape(-1).tolist() == case['expert_without_jitter']
    assert clean.reshape(-1).tolist() != case['expert']
