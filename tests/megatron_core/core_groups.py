"""Records the process groups Megatron-Core's own `initialize_model_parallel` creates.

Owns: running `megatron.core.parallel_state.initialize_model_parallel` (core_v0.19.0, from the
installed megatron-core or the checkout named by MEGATRON_LM) with torch.distributed replaced by
a recorder, for the worlds 1, 2, 3, 4, 6, 8, 12 and 16 and every tensor, pipeline, expert-parallel and
expert-tensor size it accepts (expert-tensor 1 or the tensor size, the two fmoec plans), and
writing each kind of group fmoec's planner lists, in creation order, to `core_groups.json`
(`tests/compiler/plan_megatron.rs` compares the planner with it). Must not know fmoec's formulas.

    MEGATRON_LM=/tmp/megatron-core-0.19.0 python tests/megatron_core/core_groups.py

(`pip download --no-deps --only-binary=:all: --python-version 3.12 megatron-core==0.19.0` and
an unzip give such a folder; Python 3.11 or 3.12 with torch.)
"""
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if os.environ.get('MEGATRON_LM'):
    sys.path.insert(0, os.environ['MEGATRON_LM'])

# Megatron's `group_desc` of each kind fmoec's plan lists
KINDS = {
    'tensor': 'TENSOR_MODEL_PARALLEL_GROUP',
    'pipeline': 'PIPELINE_MODEL_PARALLEL_GROUP',
    'data': 'DATA_PARALLEL_GROUP',
    'model': 'MODEL_PARALLEL_GROUP',
    'embedding': 'EMBEDDING_GROUP',
    'expert': 'EXPERT_MODEL_PARALLEL_GROUP',
    'expert_tensor': 'EXPERT_TENSOR_PARALLEL_GROUP',
    'expert_data': 'EXPERT_DATA_PARALLEL_GROUP',
}


def record(world, tp, pp, ep, etp):
    """Every new_group call of initialize_model_parallel on rank 0 (each rank makes the same
    calls in the same order), grouped by Megatron's description of the group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    calls = []

    def new_group(ranks=None, **kwargs):
        calls.append((kwargs.get('group_desc'), list(ranks)))
        return object()

    dist.is_initialized = lambda: True
    dist.is_available = lambda: True
    dist.get_world_size = lambda group=None: world
    dist.get_rank = lambda group=None: 0
    dist.new_group = new_group
    dist.barrier = lambda *a, **k: None
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)
    out = {kind: [ranks for desc, ranks in calls if desc == name]
           for kind, name in KINDS.items()}
    ps.destroy_model_parallel()
    return out


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def main():
    warnings.simplefilter('ignore')
    cases = []
    for world in (1, 2, 3, 4, 6, 8, 12, 16):
        for tp in divisors(world):
            for pp in divisors(world // tp):
                for etp in sorted({1, tp}):
                    for ep in divisors(world // (pp * etp)):
                        groups = record(world, tp, pp, ep, etp)
                        cases.append(dict(world=world, tensor=tp, pipeline=pp,
                                          expert_parallel=ep, expert_tensor=etp, groups=groups))
    path = os.path.join(HERE, 'core_groups.json')
    with open(path, 'w') as f:
        f.write('[\n' + ',\n'.join(json.dumps(c, separators=(',', ':')) for c in cases) + '\n]\n')
    print('%d layouts recorded to %s' % (len(cases), path))


if __name__ == '__main__':
    main()
