"""Checks an emitted train.sh's arguments against Megatron-Core itself, standing in for
pretrain_gpt.py.

Owns: taking the arguments train.sh hands its training script and (a) feeding them to Megatron's
own argument parser and validation (`megatron.training.arguments.parse_and_validate_args`,
exactly as pretrain_gpt.py calls it) with the world size of the plan, (b) building
`TransformerConfig` from them with the real layout (it validates more), (c) building the model
the way pretrain_gpt.py does (`gpt_config_from_args` -> `GPTModelBuilder.build_model`, the
generated module through `--spec`) on the meta device in one rank (every parameter once), and
(d) comparing its parameters by kind, and the layout and batch of the arguments, with
`fmoec plan --megatron core_v0.19 --format json` of the same file (FMOEC_PLAN_JSON). Must not know
how to train (train_tiny.py) or what the fmoec layer does inside.

    fmoec emit --megatron core_v0.19 examples/mixtral-8x7b.fmoe -o out
    fmoec plan --megatron core_v0.19 --format json examples/mixtral-8x7b.fmoe > plan.json
    PRETRAIN=$PWD/tests/megatron_core/check_args.py FMOEC_PLAN_JSON=plan.json MOCK_DATA=1 \\
        NPROC_PER_NODE=1 PYTHONPATH=<megatron-core> bash out/train.sh

Megatron-Core comes from the Python path (PyPI megatron-core==0.19.0, or its wheel unzipped, or
a checkout at tag core_v0.19.0); Python 3.11 works through mcore_cpu.py's `typing.override`.
Prints what it checked and `CHECK_ARGS_OK`, exit status 0, when every check holds.
"""
import contextlib
import copy
import io
import json
import os
import socket
import sys
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


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
    kinds['total'] = sum(kinds.values())
    return kinds


def memory_report(args, plan, micro_batches):
    """Megatron-Core's own theoretical memory report (what its training prints with its first
    log lines: the most loaded rank) beside fmoec plan's most loaded stage. Information: the
    two count different things (README.md, Megatron-Core)."""
    from megatron.training.theoretical_memory_usage import report_theoretical_memory
    with contextlib.redirect_stdout(io.StringIO()):
        weights_optim, activations, total = report_theoretical_memory(
            copy.copy(args), num_microbatches=micro_batches)
    worst = max(plan['stages'], key=lambda st: st['cost']['memory']['total'])
    mem = worst['cost']['memory']
    mib = 1024 * 1024
    print('  memory per GPU (MiB)          weights+grads+optimizer  activations        total')
    print('  Megatron-Core theoretical     %23.0f %12.0f %12.0f   (most loaded rank)'
          % (weights_optim, activations, total))
    print('  fmoec plan --megatron         %23.0f %12.0f %12.0f   (stage %d, %d micro-batches '
          'in flight)' % ((mem['weights'] + mem['grads'] + mem['optimizer']) / mib,
                          mem['activations'] / mib, mem['total'] / mib, worst['stage'],
                          mem['in_flight']))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main():
    warnings.simplefilter('ignore')
    import logging
    logging.disable(logging.WARNING)
    plan_path = os.environ.get('FMOEC_PLAN_JSON')
    if not plan_path:
        raise SystemExit('set FMOEC_PLAN_JSON to `fmoec plan --megatron core_v0.19 --format json` '
                         'of the emitted file')
    with open(plan_path) as f:
        plan = json.load(f)
    argv = sys.argv[1:]
    problems = []

    import torch
    import mcore_cpu

    # (a) Megatron's own parser and validation, with the plan's world size
    world = plan['world']
    os.environ.update(WORLD_SIZE=str(world), RANK='0', LOCAL_RANK='0')
    mcore_cpu.install(device='meta')
    # validate_args asks the GPU's compute capability (8.0+ for grouped GEMM; below 10 it wants
    # CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor parallelism): answer for an H100 (9.0)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=9, minor=0, name='H100 (stand-in for the check)',
        total_memory=plan['hardware']['memory_bytes'], multi_processor_count=132)
    sys.argv = ['pretrain_gpt.py'] + argv
    from megatron.training.arguments import parse_and_validate_args
    with contextlib.redirect_stdout(io.StringIO()):      # Megatron prints every argument
        args = parse_and_validate_args(args_defaults={'tokenizer_type': 'GPT2BPETokenizer'})
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    print('%s: %d argument words accepted by parse_and_validate_args (world %d: tensor %d, '
          'pipeline %d, data %d; expert-parallel %d, expert-tensor %d; %d micro-batches of %d; '
          'vocabulary %d; %s)' % (
              plan['model'], len(argv), world, args.tensor_model_parallel_size,
              args.pipeline_model_parallel_size, args.data_parallel_size,
              args.expert_model_parallel_size, args.expert_tensor_parallel_size,
              get_num_microbatches(), args.micro_batch_size, args.padded_vocab_size,
              'the fmoec layer via --spec' if args.spec else 'native MoE'), flush=True)
    # the files, as Megatron received them (train.sh runs in the checkout: relative paths would
    # be read from there)
    print('%s: data_path %r vocab_file %r merge_file %r save %r load %r' % (
        plan['model'], args.data_path, args.vocab_file, args.merge_file, args.save, args.load),
        flush=True)
    core = plan['megatron_core']
    expected = {
        'tensor': (args.tensor_model_parallel_size, plan['tensor']),
        'pipeline': (args.pipeline_model_parallel_size, plan['pipeline']),
        'data': (args.data_parallel_size, plan['data']),
        'expert-parallel': (args.expert_model_parallel_size, core['expert_parallel']),
        'expert-tensor': (args.expert_tensor_parallel_size, core['expert_tensor']),
        'micro-batch': (args.micro_batch_size, plan['micro_batch']),
        'micro-batches': (get_num_microbatches(), plan['micro_batches']),
        'vocabulary': (args.padded_vocab_size, core['padded_vocab']),
        'distributed optimizer': (bool(args.use_distributed_optimizer),
                                  core['distributed_optimizer']),
    }
    for what, (mine, theirs) in expected.items():
        if mine != theirs:
            problems.append('%s: %s in the arguments, %s in the plan' % (what, mine, theirs))
    memory_report(args, plan, get_num_microbatches())
    # Apex's persistent LayerNorm, its fused weight-gradient accumulation and Transformer
    # Engine's fused rotary embedding are kernels with no CPU form; they hold no parameters
    args.no_persist_layer_norm = True
    args.gradient_accumulation_fusion = False
    args.apply_rope_fusion = False
    # (b) the model configuration with the real layout: TransformerConfig validates what
    # parse_and_validate_args leaves to it (e.g. biases in MoE layers need expert-tensor size 1)
    from megatron.training.argument_utils import core_transformer_config_from_args
    try:
        core_transformer_config_from_args(copy.copy(args))
        print('%s: TransformerConfig accepts the layout' % plan['model'])
    except (AssertionError, ValueError) as e:
        problems.append('TransformerConfig refuses the layout: %s' % e)

    # (c) the model as pretrain_gpt.py builds it, on one rank (every parameter once)
    args.use_cpu_initialization = False
    for name in ('tensor_model_parallel_size', 'pipeline_model_parallel_size',
                 'expert_model_parallel_size', 'expert_tensor_parallel_size'):
        setattr(args, name, 1)
    args.sequence_parallel = False
    import torch.distributed as dist
    # one process of its own, not torchrun's rendezvous (whose store would wait for the plan's
    # world to join)
    os.environ.pop('TORCHELASTIC_USE_AGENT_STORE', None)
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
    moe_layers = sum(1 for m in model.modules()
                     if type(m).__name__ in ('MoELayer', 'FmoecMoELayer'))
    print('%s: %s, %d MoE layers (%s)' % (
        plan['model'], type(model).__name__, moe_layers,
        ', '.join(sorted(set(type(m).__name__ for m in model.modules()
                             if type(m).__name__ in ('MoELayer', 'FmoecMoELayer'))))))
    if moe_layers != len(plan['moe_layers']):
        problems.append('%d MoE layers built, %d in the plan' % (moe_layers,
                                                                  len(plan['moe_layers'])))
    print('  %-28s %16s %16s %14s' % ('parameters', 'Megatron-Core', 'fmoec plan', 'difference'))
    rows = [('routed experts', counts['expert'], mine['expert']),
            ('gates (routers)', counts['gate'], mine['gate']),
            ('everything else', counts['total'] - counts['expert'] - counts['gate'],
             mine['total'] - mine['expert'] - mine['gate']),
            ('total', counts['total'], mine['total'])]
    for label, a, b in rows:
        print('  %-28s %16s %16s %14s' % (label, '{:,}'.format(a), '{:,}'.format(b),
                                          '{:+,}'.format(a - b)))
        if a != b:
            problems.append('%s: %s (Megatron-Core) != %s (fmoec plan)' % (
                label, '{:,}'.format(a), '{:,}'.format(b)))
    print('  (Megatron-Core: word embeddings %s, position embeddings %s, output layer %s, '
          'shared experts %s)' % tuple('{:,}'.format(counts[k]) for k in (
              'word_embeddings', 'position_embeddings', 'output_layer', 'shared_expert')))
    for p in problems:
        print('  PROBLEM: ' + p)
    print('%s: %s' % (plan['model'], 'CHECK_ARGS_OK' if not problems else 'FAILED'), flush=True)
    dist.destroy_process_group()
    sys.exit(1 if problems else 0)


if __name__ == '__main__':
    main()
