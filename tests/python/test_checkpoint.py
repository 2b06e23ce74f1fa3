"""Expert shards per data rank: save after training steps, scramble, load: bit-identical
expert parameters and optimizer state; each rank holds different experts."""
import tempfile

import torch

import workers


def test_checkpoint_round_trip_two_expert_ranks():
    folder = tempfile.mkdtemp()
    r0, r1 = workers.run(2, workers.checkpoint_round_trip, folder)
    for r in (r0, r1):
        assert r['experts_equal'] and r['state_equal']
        assert r['experts'] == ['experts.htoh4_weight', 'experts.htoh4_bias',
                                'experts.h4toh_weight', 'experts.h4toh_bias']
    assert r1['name'].endswith('iter_0000002/mp_rank_00_dp_rank_0001/model_optim_rng.pt')
    assert not torch.equal(r0['weight'], r1['weight'])
