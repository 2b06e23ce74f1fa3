"""Runs Megatron-LM's own pretrain_gpt.py (tag core_v0.19.0) on CPU ranks with gloo, as the
training script of an emitted train.sh.

Owns: starting the tree's training script unchanged, with the CPU stand-ins of mcore_cpu.py
installed first (and its mends of the distributed optimizer's resume on the torch-AdamW path, which
every CPU takes), the arguments train.sh gives and the switches a CPU needs (gloo, Megatron-Core's
local modules, no fused kernels) after them. Must not change what pretrain_gpt.py does: no patch
of the tree, the model comes from the arguments (`--spec fmoec_moe transformer_layer_spec` finds
the generated module through train.sh's PYTHONPATH).

    fmoec emit --megatron core_v0.19 model.fmoe -o out
    PRETRAIN=$PWD/tests/megatron_core/pretrain_cpu.py MEGATRON_LM=/tmp/megatron-lm-core_v0.19.0 \\
        MOCK_DATA=1 NPROC_PER_NODE=2 bash out/train.sh --train-iters 4

pretrain_gpt.py, gpt_builders.py and model_provider.py live at the root of the Megatron-LM tree
and are not in the PyPI wheel: this needs a checkout (MEGATRON_LM), and Python 3.12 or the
`typing.override` stand-in of mcore_cpu.py.
"""
import os
import runpy
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
# Megatron's fused bias-GELU / bias-dropout-add are torch.compile'd and warmed up before the
# first step; on a CPU that means inductor and a C++ compiler. Run them eagerly instead.
os.environ.setdefault('TORCHDYNAMO_DISABLE', '1')

# What a CPU needs and the arguments cannot express otherwise: gloo instead of NCCL, the local
# (non-Transformer-Engine) modules, and none of the fused CUDA kernels (they hold no parameters).
CPU_ARGUMENTS = [
    '--distributed-backend', 'gloo',
    '--transformer-impl', 'local',
    '--no-gradient-accumulation-fusion',
    '--no-persist-layer-norm',
    '--no-rope-fusion',
    '--no-bias-dropout-fusion',
    '--no-bias-gelu-fusion',
    '--no-masked-softmax-fusion',
    '--num-workers', '0',
]


def main():
    tree = os.environ.get('MEGATRON_LM')
    if not tree or not os.path.exists(os.path.join(tree, 'pretrain_gpt.py')):
        raise SystemExit('set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.19.0 '
                         '(pretrain_gpt.py is not in the megatron-core wheel)')
    argv = sys.argv[1:]
    # grouped GEMM needs Transformer Engine, which a CPU has not
    argv = [a for a in argv if a != '--moe-grouped-gemm']
    sys.path[:0] = [tree, HERE]
    warnings.simplefilter('ignore')
    import mcore_cpu
    mcore_cpu.install()
    mcore_cpu.pretend_cuda_for_training()
    mcore_cpu.resumable_distributed_optimizer()
    # later arguments win in argparse: the CPU switches last
    sys.argv = [os.path.join(tree, 'pretrain_gpt.py')] + argv + CPU_ARGUMENTS
    os.chdir(tree)
    runpy.run_path(os.path.join(tree, 'pretrain_gpt.py'), run_name='__main__')


if __name__ == '__main__':
    main()
