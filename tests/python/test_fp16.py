"""fp16: an overflow that only one data rank sees (in its expert gradients, which are not
reduced across data ranks) makes every rank skip the step, whichever rank it is. Without the
agreement the rank with the overflow skips while the others go on into clipping: a deadlock."""
import workers


def test_every_rank_sees_an_overflow_of_one_data_rank():
    for overflow_rank in range(3):
        results = workers.run(3, workers.found_inf_agreement, overflow_rank)
        assert [r['found_inf'] for r in results] == [1.0, 1.0, 1.0], overflow_rank


def test_no_overflow_stays_no_overflow():
    results = workers.run(2, workers.found_inf_agreement, -1)
    assert [r['found_inf'] for r in results] == [0.0, 0.0]
