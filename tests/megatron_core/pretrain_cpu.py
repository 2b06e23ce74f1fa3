"""Runs Megatron-LM's own pretrain_gpt.py (core_v0.19.0 tree) on CPU ranks with gloo.

Owns: starting the tree's training script unchanged, with the CPU stand-ins of mcore_cpu.py
installed first and the arguments of one `args/EXAMPLE.args` file plus the switches a CPU needs
(gloo, Megatron-Core's local modules, no fused kernels) and any given after `--`. Must not
change what pretrain_gpt.py does: no patch of the tree, the model comes from the arguments
(`--spec fmoec_moe transformer_layer_spec` picks fmoec_moe.py next to this file).

    MEGATRON_LM=/tmp/mlm-core_v0.19.0 python -m torch.distributed.run --nproc_per_node=2 \\
        pretrain_cpu.py tiny -- --expert-model-parallel-size 2 --train-iters 4

pretrain_gpt.py, gpt_builders.py and model_provider.py live at the root of the Megatron-LM tree
and are not in the PyPI wheel: this needs a checkout.
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
    if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
        raise SystemExit('usage: pretrain_cpu.py EXAMPLE|FILE.args [-- MORE MEGATRON ARGUMENTS]')
    tree = os.environ.get('MEGATRON_LM')
    if not tree or not os.path.exists(os.path.join(tree, 'pretrain_gpt.py')):
        raise SystemExit('set MEGATRON_LM to a Megatron-LM checkout at tag core_v0.19.0 '
                         '(pretrain_gpt.py is not in the megatron-core wheel)')
    example, extra = sys.argv[1], sys.argv[2:]
    if extra[:1] == ['--']:
        extra = extra[1:]
    sys.path[:0] = [tree, HERE]
    import check_args
    path = example if example.endswith('.args') else os.path.join(HERE, 'args', example + '.args')
    argv = check_args.read_args(path)
    if example in check_args.FMOEC_TABLES:
        import fmoec_moe
        fmoec_moe._FMOEC_LAYERS = check_args.FMOEC_TABLES[example]
    warnings.simplefilter('ignore')
    import mcore_cpu
    mcore_cpu.install()
    mcore_cpu.pretend_cuda_for_training()
    # later arguments win in argparse: the CPU switches, then the caller's
    sys.argv = [os.path.join(tree, 'pretrain_gpt.py')] + argv + CPU_ARGUMENTS + extra
    os.chdir(tree)
    runpy.run_path(os.path.join(tree, 'pretrain_gpt.py'), run_name='__main__')


if __name__ == '__main__':
    main()
