"""Checks the Megatron-Core launch arguments of the six examples against Megatron-LM itself.

Owns: for each `args/EXAMPLE.args`, (a) feeding it to the tree's own argument parser and
validation (`megatron.training.arguments.parse_and_validate_args`, exactly as pretrain_gpt.py
calls it, with the world size fmoec plan gives), (b) building the model the way pretrain_gpt.py
does (`gpt_config_from_args` -> `GPTModelBuilder.build_model`) on the meta device, in one rank
(the distinct parameters of the whole model), and (c) printing its parameter count by kind next
to `fmoec plan --format json`'s. Must not know how to train (train_tiny.py) or what the fmoec
layer does inside (fmoec_moe.py, imported through `--spec` as a real run would).

    MEGATRON_LM=/tmp/mlm-core_v0.19.0 python check_args.py            # all six
    python check_args.py mixtral-8x7b --fmoec target/release/fmoec     # one

MEGATRON_LM names a Megatron-LM checkout at tag core_v0.19.0 (put first on sys.path); without
it the installed megatron-core package is used (its wheel carries megatron.training too).
Each example runs in its own process (Megatron's global state is set once per process).
Exit status 0 when every example's arguments are accepted and its count equals fmoec's.
"""
import argparse
import contextlib
import copy
import io
import json
import os
import shlex
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EXAMPLES = ['tiny', 'gpt2-medium-moe', 'gpt345m-fmoefy', 'mixtral-8x7b', 'deepseek-moe',
            'plan-only']

# What the generated fmoec_moe.py's layer table would hold for the examples that need the fmoec
# layer (global 0-based layer index -> spec), transcribed from the model files.
FMOEC_TABLES = {
    'tiny': {i: dict(experts=8, top_k=2, gate='gshard', hidden=256, act='gelu',
                     capacity=(1.2, 2.4), balance_loss=0.01, random_routing=True)
             for i in (1, 3)},
    'gpt2-medium-moe': {
        i: (dict(experts=32, top_k=2, gate='gshard', hidden=4096, act='gelu',
                 capacity=(1.2, 2.4), balance_loss=0.01, random_routing=True) if i == 23 else
            dict(experts=16, top_k=2, gate='gshard', hidden=2048, act='gelu',
                 capacity=(1.25, 2.0), balance_loss=0.01, random_routing=True))
        for i in range(1, 24, 2)},
    'plan-only': {i: dict(experts=64, top_k=1, gate='switch', hidden=6400, act='gelu',
                          capacity=(1.0, 2.0), balance_loss=0.01, jitter=0.01)
                  for i in range(1, 48, 2)},
}


def read_args(path):
    argv = []
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                argv += shlex.split(line)
    return argv


def fmoec_plan(fmoec, example):
    out = subprocess.run([fmoec, 'plan', '--format', 'json',
                          os.path.join(REPO, 'examples', example + '.fmoe')],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit('fmoec plan failed for %s:\n%s' % (example, out.stderr))
    return json.loads(out.stdout)


def count_by_kind(model):
    """Megatron's parameters grouped like fmoec's plan: routed experts, gates (routers), the
    rest; shared experts and the embeddings listed apart for the explanation."""
    kinds = {'expert': 0, 'gate': 0, 'shared_expert': 0, 'word_embeddings': 0,
             'position_embeddings': 0, 'output_layer': 0, 'other': 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if '.mlp.experts.' in name:
            kinds['expert'] += n
        elif '.mlp.router.' in name or '.mlp.gate.' in name:
            kinds['gate'] += n
        elif '.mlp.shared_experts.' in name:
            kinds['shared_expert'] += n
        elif 'word_embeddings' in name:
            kinds['word_embeddings'] += n
        elif 'position_embeddings' in name:
            kinds['position_embeddings'] += n
        elif name.startswith('output_layer'):
            kinds['output_layer'] += n
        else:
            kinds['other'] += n
    kinds['total'] = sum(v for k, v in kinds.items())
    return kinds


def compare_memory(args, plan, micro_batches):
    """Megatron's own theoretical memory report (what --log-memory-to-tensorboard's first line
    and report_theoretical_memory print: the most loaded rank) beside fmoec plan's largest
    stage. Information only: the two models differ (see NOTES.md, memory)."""
    from megatron.training.theoretical_memory_usage import report_theoretical_memory
    import copy
    with contextlib.redirect_stdout(io.StringIO()):
        weights_optim, activations, total = report_theoretical_memory(
            copy.copy(args), num_microbatches=micro_batches)
    worst = max(plan['stages'], key=lambda st: st['cost']['memory']['total'])
    mem = worst['cost']['memory']
    mib = 1024 * 1024
    print('  memory per GPU (MiB)          weights+grads+optimizer  activations        total')
    print('  Megatron-Core theoretical     %23.0f %12.0f %12.0f   (most loaded rank; %s'
          'optimizer)' % (weights_optim, activations, total,
                          'distributed ' if args.use_distributed_optimizer else 'plain '))
    print('  fmoec plan (v2.2 model)       %23.0f %12.0f %12.0f   (stage %d, %d micro-batches '
          'in flight)' % ((mem['weights'] + mem['grads'] + mem['optimizer']) / mib,
                          mem['activations'] / mib, mem['total'] / mib, worst['stage'],
                          mem['in_flight']))
    # the plan's parameters per rank with Megatron-Core's bytes per parameter (NOTES.md,
    # memory): what the planner would print for this target
    counts = worst['cost']['params']
    dense = counts['sharded'] + counts['replicated'] + counts['gate']
    edp = args.world_size // (args.expert_tensor_parallel_size
                              * args.expert_model_parallel_size
                              * args.pipeline_model_parallel_size)
    core = (dense * bytes_per_parameter(args, args.data_parallel_size)
            + counts['expert'] * bytes_per_parameter(args, edp)) / mib
    print('  plan params x Megatron-Core bytes/param %13.0f   (dense x %.2f B, experts x %.2f '
          'B: expert-data-parallel %d)' % (core, bytes_per_parameter(args, args.data_parallel_size),
                                          bytes_per_parameter(args, edp), edp))


def bytes_per_parameter(args, shards):
    """Weights, main gradients and optimizer state per parameter under Megatron-Core
    (docs/user-guide/features/dist_optimizer.md): the distributed optimizer divides the fp32
    main weights and Adam moments over `shards` ranks (the data-parallel group for dense
    parameters, the expert-data-parallel group for experts)."""
    if args.bf16:
        kept, sharded = 6, 12       # bf16 weight + fp32 main grad; fp32 main weight + 2 moments
    elif args.fp16:
        kept, sharded = 4, 16       # fp16 weight + fp16 grad; fp32 main weight, grad, 2 moments
    else:
        kept, sharded = 8, 8        # fp32 weight + grad; 2 moments
    return kept + sharded / shards if args.use_distributed_optimizer else kept + sharded


def check_one(example, fmoec, tokenizer_padding=False):
    """Runs in its own process: parse, validate, build, count, compare."""
    warnings.simplefilter('ignore')
    import logging
    logging.disable(logging.WARNING)
    if os.environ.get('MEGATRON_LM'):
        sys.path.insert(0, os.environ['MEGATRON_LM'])
    sys.path.insert(0, HERE)
    plan = fmoec_plan(fmoec, example)
    argv = read_args(os.path.join(HERE, 'args', example + '.args'))
    if tokenizer_padding:
        # what Megatron builds when the vocabulary comes from the tokenizer: padded to a
        # multiple of --make-vocab-size-divisible-by (128) x tensor size
        i = argv.index('--padded-vocab-size')
        del argv[i:i + 2]

    import torch
    import mcore_cpu
    problems = []

    # the arguments against the plan's layout and batch
    def value(flag, default=None, kind=int):
        if flag in argv:
            return kind(argv[argv.index(flag) + 1])
        return default
    tp, pp = value('--tensor-model-parallel-size', 1), value('--pipeline-model-parallel-size', 1)
    ep = value('--expert-model-parallel-size', 1)
    etp = value('--expert-tensor-parallel-size', tp)
    mbs, gbs = value('--micro-batch-size'), value('--global-batch-size')
    expected = {'tensor': (tp, plan['tensor']), 'pipeline': (pp, plan['pipeline']),
                'micro batch': (mbs, plan['micro_batch']),
                'global batch': (gbs, plan['global_batch']),
                'ranks splitting a layer\'s experts': (ep * etp, plan['expert_group_size']
                                     * (tp if plan['expert_slicing'] else 1))}
    if etp not in (1, tp if plan['expert_slicing'] else 1):
        problems.append('expert-tensor size %d: the plan slices experts over %s' % (
            etp, '%d tensor ranks' % tp if plan['expert_slicing'] else 'no ranks'))
    for what, (mine, theirs) in expected.items():
        if mine != theirs:
            problems.append('%s: %s in the arguments, %s in the plan' % (what, mine, theirs))

    # (a) Megatron's own parser and validation, with the plan's world size
    world = plan['world']
    os.environ.update(WORLD_SIZE=str(world), RANK='0', LOCAL_RANK='0')
    have_te = True
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        have_te = False
    if not have_te and '--transformer-impl' not in argv:
        # the arguments name no implementation (Megatron's default is Transformer Engine);
        # without it the same model is built from Megatron-Core's local modules
        argv += ['--transformer-impl', 'local']
    mcore_cpu.install(device='meta')
    # validate_args asks the GPU's compute capability (8.0+ for --moe-grouped-gemm; below 10 it
    # requires CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor parallelism): answer for the H100
    # (9.0) the example files declare
    import types
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=9, minor=0, name='H100 (stand-in for the check)',
        total_memory=plan['hardware']['memory_bytes'], multi_processor_count=132)
    os.environ.setdefault('CUDA_DEVICE_MAX_CONNECTIONS', '1')
    import fmoec_moe
    if example in FMOEC_TABLES:
        fmoec_moe._FMOEC_LAYERS = FMOEC_TABLES[example]
    sys.argv = ['pretrain_gpt.py'] + argv
    from megatron.training.arguments import parse_and_validate_args
    with contextlib.redirect_stdout(io.StringIO()):      # Megatron prints every argument
        args = parse_and_validate_args(args_defaults={'tokenizer_type': 'GPT2BPETokenizer'})
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    print('%s: %d argument words accepted by parse_and_validate_args (world %d: tensor %d, pipeline '
          '%d, data %d; expert-parallel %d, expert-tensor %d; %d micro-batches of %d; padded '
          'vocabulary %d)%s' % (
              example, len(argv), world, args.tensor_model_parallel_size,
              args.pipeline_model_parallel_size, args.data_parallel_size,
              args.expert_model_parallel_size, args.expert_tensor_parallel_size,
              get_num_microbatches(), args.micro_batch_size, args.padded_vocab_size,
              '' if have_te else ' [--transformer-impl local: no Transformer Engine here]'),
          flush=True)
    if args.data_parallel_size != plan['data']:
        problems.append('data: Megatron derives %d, the plan %d' % (args.data_parallel_size,
                                                                     plan['data']))
    compare_memory(args, plan, get_num_microbatches())
    # Apex's persistent LayerNorm kernel (Megatron's default) has no CPU form; the torch norm
    # holds the same parameters
    args.no_persist_layer_norm = True
    # likewise Apex's fused weight-gradient accumulation and Transformer Engine's fused rotary
    # embedding (kernels, no parameters)
    args.gradient_accumulation_fusion = False
    args.apply_rope_fusion = False
    # the model configuration with the real layout: TransformerConfig validates what
    # parse_and_validate_args leaves to it (e.g. biases in MoE layers need expert-tensor size 1)
    from megatron.training.argument_utils import core_transformer_config_from_args
    try:
        core_transformer_config_from_args(copy.copy(args))
        print('%s: TransformerConfig accepts the layout' % example)
    except (AssertionError, ValueError) as e:
        problems.append('TransformerConfig refuses the layout: %s' % e)

    # (b) the model as pretrain_gpt.py builds it, on one rank (every parameter once)
    args.use_cpu_initialization = False
    for name in ('tensor_model_parallel_size', 'pipeline_model_parallel_size',
                 'expert_model_parallel_size', 'expert_tensor_parallel_size'):
        setattr(args, name, 1)
    args.sequence_parallel = False
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d' % _free_port(),
                            world_size=1, rank=0)
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder
    model_cfg = gpt_config_from_args(args)
    model_cfg.transformer.perform_initialization = False
    with torch.device('meta'), contextlib.redirect_stdout(io.StringIO()):
        model = GPTModelBuilder(model_cfg).build_model(
            ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
    counts = count_by_kind(model)
    mine = plan['params']
    moe_layers = sum(1 for m in model.modules() if type(m).__name__ in ('MoELayer',
                                                                          'FmoecMoELayer'))
    print('%s: %s, %d MoE layers (%s)' % (
        example, type(model).__name__, moe_layers,
        'fmoec layer via --spec' if example in FMOEC_TABLES else 'native MoELayer'))
    print('  %-28s %16s %16s %14s' % ('parameters', 'Megatron-Core', 'fmoec plan', 'difference'))
    rows = [('routed experts', counts['expert'], mine['expert']),
            ('gates (routers)', counts['gate'], mine['gate']),
            ('everything else', counts['total'] - counts['expert'] - counts['gate'],
             mine['total'] - mine['expert'] - mine['gate']),
            ('total', counts['total'], mine['total'])]
    for label, a, b in rows:
        print('  %-28s %16s %16s %14s' % (label, '{:,}'.format(a), '{:,}'.format(b),
                                          '{:+,}'.format(a - b)))
    print('  (Megatron-Core: word embeddings %s, position embeddings %s, output layer %s, '
          'shared experts %s)' % tuple('{:,}'.format(counts[k]) for k in (
              'word_embeddings', 'position_embeddings', 'output_layer', 'shared_expert')))
    if counts['total'] != mine['total']:
        problems.append('parameter count %s (Megatron-Core) != %s (fmoec plan)' % (
            '{:,}'.format(counts['total']), '{:,}'.format(mine['total'])))
    for p in problems:
        print('  PROBLEM: ' + p)
    print('%s: %s' % (example, 'OK' if not problems else 'FAILED'), flush=True)
    dist.destroy_process_group()
    return not problems


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('examples', nargs='*', default=EXAMPLES, metavar='EXAMPLE',
                    help='examples to check (default: all six: %s)' % ', '.join(EXAMPLES))
    ap.add_argument('--fmoec', default=os.path.join(REPO, 'target', 'release', 'fmoec'),
                    help='the fmoec binary (default: target/release/fmoec)')
    ap.add_argument('--tokenizer-padding', action='store_true',
                    help='drop --padded-vocab-size: show the count Megatron gets when it pads '
                         'the tokenizer\'s vocabulary itself')
    ap.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
    h = ap.parse_args()
    if not os.path.exists(h.fmoec):
        raise SystemExit('no fmoec binary at %s: build it with `cargo build --release '
                         '--no-default-features` or pass --fmoec' % h.fmoec)
    unknown = [e for e in h.examples if e not in EXAMPLES]
    if unknown:
        raise SystemExit('unknown example(s) %s; known: %s' % (', '.join(unknown),
                                                                ', '.join(EXAMPLES)))
    if h.one:
        sys.exit(0 if check_one(h.examples[0], h.fmoec, h.tokenizer_padding) else 1)
    failed = []
    for example in h.examples:
        extra = ['--tokenizer-padding'] if h.tokenizer_padding else []
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--one', example,
                               '--fmoec', h.fmoec] + extra, capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        print('\n'.join(lines) if lines else '', flush=True)
        if proc.returncode != 0:
            failed.append(example)
            if 'OK' not in proc.stdout.splitlines()[-1:] and 'FAILED' not in proc.stdout:
                print('%s: crashed (exit %d):\n%s' % (example, proc.returncode,
                                                      '\n'.join(proc.stderr.splitlines()[-20:])))
    print('\n%d examples, %d failed%s' % (len(h.examples), len(failed),
                                          ': ' + ', '.join(failed) if failed else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
