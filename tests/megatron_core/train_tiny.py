"""A real Megatron-Core training of a tiny GPT with MoE layers on CPU ranks (gloo).

Owns: the training loop a Megatron-Core user runs, built only from Megatron-Core's public
pieces: parallel_state's groups, GPTModel from a layer spec, its DistributedDataParallel, its
optimizer (`get_megatron_optimizer`, plain or distributed, with clipping), the pipeline schedules
(`get_forward_backward_func`), finalize_model_grads and dist_checkpointing. It checks what a
training must get right on every layout and prints one line per check. Must not know how a MoE
layer works inside: the layer comes from Megatron's own spec (`--moe native`) or from the fmoec
module (`--moe fmoec`: the fmoec_moe.py of `fmoec emit --megatron core_v0.19`, found on
PYTHONPATH; its layer table is replaced by this script's), and is only trained here.

Megatron-Core comes from the Python path: the PyPI package `megatron-core==0.19.0`, or a
Megatron-LM checkout at tag core_v0.19.0 named by MEGATRON_LM (put first on sys.path).

    torchrun --nproc_per_node=2 train_tiny.py --ep 2
    torchrun --nproc_per_node=4 train_tiny.py --tp 2 --ep 2
    torchrun --nproc_per_node=2 train_tiny.py --pp 2
    torchrun --nproc_per_node=1 train_tiny.py --save-init DIR       # the reference run
    torchrun --nproc_per_node=4 train_tiny.py --tp 2 --ep 2 --load-init DIR   # same losses?

A run trains `--steps` steps (losses printed) and checks that the loss falls, that clipping
triggered and left the clipped norm, that data-parallel replicas hold bit-identical non-expert
parameters and expert replicas bit-identical experts (and expert ranks different ones), that the
bytes held for weights, gradients and optimizer state follow the Megatron-Core memory formula,
the reference run's losses (with --load-init), and that a checkpoint saved at `--save-step` and
loaded into a fresh model and optimizer gives bit-identical losses for the remaining steps.
Exit status 0 and `TRAIN_TINY_OK` on rank 0 when all hold.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if os.environ.get('MEGATRON_LM'):
    sys.path.insert(0, os.environ['MEGATRON_LM'])
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB = 128
SEQ = 16


def parse_arguments():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tp', type=int, default=1, help='tensor-parallel size')
    ap.add_argument('--pp', type=int, default=1, help='pipeline-parallel size')
    ap.add_argument('--ep', type=int, default=1, help='expert-parallel size')
    ap.add_argument('--etp', type=int, default=None,
                    help='expert tensor-parallel size (default: the tensor size, as Megatron)')
    ap.add_argument('--dist-opt', action='store_true', help='the distributed optimizer')
    ap.add_argument('--moe', choices=('native', 'fmoec'), default='native',
                    help="Megatron-Core's own MoE layer, or fmoec's (fmoec_moe.py)")
    ap.add_argument('--gate', default='naive',
                    help='fmoec gate: naive, noisy, gshard, switch, swipe (with --moe fmoec)')
    ap.add_argument('--no-random-routing', action='store_true',
                    help='fmoec gshard without its random routing of the second expert (so '
                         'that layouts can be compared with a reference run)')
    ap.add_argument('--balance-loss', type=float, default=0.01,
                    help='weight of the fmoec gates\' balance loss (0.01, the stdlib default)')
    ap.add_argument('--arch', choices=('llama', 'gpt2'), default='llama',
                    help='llama: RMSNorm, rotary, grouped-query attention, SwiGLU, no biases, '
                         'untied head, a shared expert; gpt2: LayerNorm, learned positions, '
                         'GELU, biases, tied head')
    ap.add_argument('--capacity', type=float, default=None,
                    help='native: --moe-expert-capacity-factor (tokens over it are dropped)')
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--micro-batch', type=int, default=2)
    ap.add_argument('--global-batch', type=int, default=8)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--clip', type=float, default=0.3, help='gradient clipping (0: off)')
    ap.add_argument('--seed', type=int, default=1234)
    ap.add_argument('--ckpt-dir', default=None,
                    help='checkpoint round trip in this folder (default: a temporary one)')
    ap.add_argument('--no-ckpt', action='store_true', help='skip the checkpoint round trip')
    ap.add_argument('--save-step', type=int, default=3, help='the round trip saves after this step')
    ap.add_argument('--save-init', default=None,
                    help='save the initial model here and the losses beside it (reference run)')
    ap.add_argument('--load-init', default=None,
                    help='start from the model saved by --save-init (resharded to this layout) '
                         'and compare the losses with that run\'s')
    ap.add_argument('--show-warnings', action='store_true',
                    help="keep Megatron's and torch's warnings (hidden by default)")
    ap.add_argument('--loss-tolerance', type=float, default=2e-4,
                    help='relative difference allowed against the reference losses')
    return ap.parse_args()


def log(msg, all_ranks=False):
    if all_ranks or dist.get_rank() == 0:
        print(('[rank %d] ' % dist.get_rank() if all_ranks else '') + msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def transformer_config(h):
    from megatron.core.transformer.transformer_config import TransformerConfig
    llama = h.arch == 'llama'
    kwargs = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        hidden_dropout=0.0, attention_dropout=0.0,
        # the fused bias-dropout-add is torch.compile'd: on CPU that means a C++ compiler
        bias_dropout_fusion=False,
        normalization='RMSNorm' if llama else 'LayerNorm',
        add_bias_linear=not llama,
        gated_linear_unit=llama,
        activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
        num_query_groups=2 if llama else None,
        init_method_std=0.02, transformer_impl='local',
        tensor_model_parallel_size=h.tp, pipeline_model_parallel_size=h.pp,
        expert_model_parallel_size=h.ep,
        expert_tensor_parallel_size=h.etp if h.etp is not None else h.tp,
        sequence_parallel=h.tp > 1,
        pipeline_dtype=torch.float32, params_dtype=torch.float32,
        bf16=False, fp16=False,
        # Layers 2 and 4 (1-based) are MoE layers: with pipeline 2, one on each stage.
        num_moe_experts=4, moe_layer_freq=[0, 1, 0, 1], moe_router_topk=2,
        moe_ffn_hidden_size=64, moe_router_load_balancing_type='aux_loss',
        moe_aux_loss_coeff=0.01, moe_token_dispatcher_type='alltoall',
        moe_grouped_gemm=False,
    )
    if llama and h.moe == 'native':
        kwargs['moe_shared_expert_intermediate_size'] = 64
    if h.capacity is not None:
        kwargs.update(moe_expert_capacity_factor=h.capacity, moe_token_drop_policy='probs',
                      moe_pad_expert_input_to_capacity=False)
    return TransformerConfig(**kwargs)


def layer_spec(config, h, fmoec_layers):
    if h.moe == 'fmoec':
        try:
            import fmoec_moe
        except ImportError as e:
            raise SystemExit('--moe fmoec imports the generated module: put a folder written by '
                             '`fmoec emit --megatron core_v0.19` on PYTHONPATH (%s)' % e)
        return fmoec_moe.layer_spec(config, layers=fmoec_layers, seed=h.seed)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization=config.normalization)


def fmoec_layer_table(h):
    """The fmoec layers of the harness model (global 0-based index -> spec), as the generated
    module's table would list them for a model file."""
    act = 'swiglu' if h.arch == 'llama' else 'gelu'
    spec = dict(experts=4, top_k=2, gate=h.gate, hidden=64, act=act, capacity=(1.2, 2.4),
                balance_loss=h.balance_loss, jitter=0.1 if h.gate == 'switch' else 0.0,
                random_routing=not h.no_random_routing)
    if h.gate == 'switch':
        spec['top_k'] = 1
    # per-layer expert counts (no native counterpart): layer 3 has twice the experts
    return {1: dict(spec), 3: dict(spec, experts=8)}


def build_model(config, h):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    torch.manual_seed(h.seed)
    model_parallel_cuda_manual_seed(h.seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, h, fmoec_layer_table(h)),
        vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=h.arch == 'gpt2',
        position_embedding_type='rope' if h.arch == 'llama' else 'learned_absolute',
    )
    return model


def wrap_ddp(config, model, h):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=h.dist_opt, bucket_size=None)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(model, h):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    cfg = OptimizerConfig(optimizer='adam', lr=h.lr, min_lr=h.lr, weight_decay=0.01,
                          adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=h.clip,
                          use_distributed_optimizer=h.dist_opt, params_dtype=torch.float32)
    return get_megatron_optimizer(cfg, [model])


# ---------------------------------------------------------------------------------------------
# Data: sample `i` of the whole run is the same sequence on every layout
# ---------------------------------------------------------------------------------------------
def sample(seed, index):
    """An arithmetic sequence over the first quarter of the vocabulary, random start and stride:
    the loss falls within a few steps (first the unused tokens, then the strides)."""
    g = torch.Generator().manual_seed(seed * 1000003 + index)
    used = VOCAB // 4
    start = int(torch.randint(0, used, (1,), generator=g))
    stride = int(torch.randint(1, 8, (1,), generator=g))
    return (start + stride * torch.arange(SEQ + 1)) % used


def batches(h, step, micro_batches, dp_rank):
    """This data rank's micro-batches of `step` (global batch = micro-batch x micro-batches x dp)."""
    first = step * h.global_batch + dp_rank * micro_batches * h.micro_batch
    for m in range(micro_batches):
        rows = [sample(h.seed, first + m * h.micro_batch + b) for b in range(h.micro_batch)]
        seq = torch.stack(rows)
        yield dict(tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous())


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch['tokens'], batch['labels']
    position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(output_tensor):
        losses = output_tensor.float()
        loss = losses.sum()
        tokens_here = torch.tensor(losses.numel(), dtype=torch.int)
        return loss, tokens_here, {'lm loss': torch.stack([loss.detach(), tokens_here.float()])}

    return output, loss_func


# ---------------------------------------------------------------------------------------------
# One training step with Megatron-Core's schedule and optimizer
# ---------------------------------------------------------------------------------------------
def train_step(model, optimizer, config, h, step):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    dp = ps.get_data_parallel_world_size()
    micro_batches = h.global_batch // (h.micro_batch * dp)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    data = batches(h, step, micro_batches, ps.get_data_parallel_rank())
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[model],
        num_microbatches=micro_batches, seq_length=SEQ, micro_batch_size=h.micro_batch,
        forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    clipped_norm = optimizer.get_grad_norm() if h.clip > 0 else None
    # the LM loss of the whole global batch, on every rank (the last stage has it)
    total = torch.zeros(2, dtype=torch.float64)
    for entry in losses:
        total += entry['lm loss'].double()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    if h.pp > 1:
        # only the last stage has losses: give them to every stage (sum over the pipeline group)
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    loss = float(total[0] / total[1])
    return ok, loss, grad_norm, clipped_norm


def gate_losses(model):
    """The fmoec layers' unweighted gate losses of this rank's last micro-batch, for the log."""
    values = ['%.4f' % float(m.last_loss) for m in model.module.modules()
              if type(m).__name__ == 'FmoecMoELayer' and hasattr(m, 'last_loss')]
    return ', gate losses ' + ' '.join(values) if values else ''


def train(model, optimizer, config, h, first, last, label):
    losses = {}
    clip_checks = []
    for step in range(first, last):
        ok, loss, norm, clipped = train_step(model, optimizer, config, h, step)
        losses[step] = loss
        extra = ''
        if clipped is not None:
            extra = ', clipped to %.6f' % clipped if norm > h.clip else ', under the clip'
            clip_checks.append((norm, clipped))
        log('%s step %d: lm loss %.6f, grad norm %.6f%s%s%s' % (
            label, step + 1, loss, norm, extra, gate_losses(model),
            '' if ok else ' (update skipped)'))
    return losses, clip_checks


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def param_fingerprints(model):
    """name -> (is_expert, sha256 of the bytes) for every parameter on this rank."""
    out = {}
    for name, p in model.module.named_parameters():
        data = p.detach().float().contiguous().numpy().tobytes()
        out[name] = (not getattr(p, 'allreduce', True), hashlib.sha256(data).hexdigest())
    return out


def check_replicas(model):
    """Non-expert parameters bit-identical across data-parallel replicas; expert parameters
    bit-identical across expert-data-parallel replicas and different across expert ranks."""
    from megatron.core import parallel_state as ps
    mine = param_fingerprints(model)
    problems = []

    def gather(group):
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, mine, group=group)
        return out

    dp = gather(ps.get_data_parallel_group())
    for name, (is_expert, digest) in mine.items():
        if not is_expert and any(r[name][1] != digest for r in dp):
            problems.append('%s differs across data-parallel replicas' % name)
    edp = gather(ps.get_expert_data_parallel_group())
    for name, (is_expert, digest) in mine.items():
        if is_expert and any(r[name][1] != digest for r in edp):
            problems.append('%s differs across expert-data-parallel replicas' % name)
    experts_differ = None
    if ps.get_expert_model_parallel_world_size() > 1:
        ep = gather(ps.get_expert_model_parallel_group())
        names = [n for n, (e, _) in mine.items() if e]
        experts_differ = bool(names) and all(
            len(set(r[n][1] for r in ep)) == len(ep) for n in names)
        if names and not experts_differ:
            problems.append('expert parameters equal on two expert ranks')
    counts = (sum(1 for e, _ in mine.values() if not e), sum(1 for e, _ in mine.values() if e))
    return problems, counts, experts_differ


def check_memory(model, optimizer, h):
    """Bytes this rank holds for weights, main gradients (DDP's buffers) and optimizer state,
    against the formula fmoec's planner would use for Megatron-Core (fp32 here: 4 B weight,
    4 B gradient, 8 B Adam moments per parameter; the distributed optimizer shards the moments
    over the data-parallel group, experts' over the expert-data-parallel group). Returns the
    problems (the measured values must be within 2% of the formula: bucket padding)."""
    from megatron.core import parallel_state as ps
    params = list(model.module.parameters())
    dense = sum(p.numel() for p in params if getattr(p, 'allreduce', True))
    expert = sum(p.numel() for p in params if not getattr(p, 'allreduce', True))
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size()
                for b in model.buffers + model.expert_parallel_buffers)
    state = 0
    for inner in getattr(optimizer, 'chained_optimizers', [optimizer]):
        for per_param in inner.optimizer.state.values():
            state += sum(v.numel() * v.element_size() for k, v in per_param.items()
                         if torch.is_tensor(v) and k != 'step')
    dp = ps.get_data_parallel_world_size()
    edp = ps.get_expert_data_parallel_world_size()
    expected_state = 8 * (dense / dp + expert / edp) if h.dist_opt else 8 * (dense + expert)
    expected = {'weights': 4 * (dense + expert), 'main grads': 4 * (dense + expert),
                'optimizer': expected_state}
    measured = {'weights': weights, 'main grads': grads, 'optimizer': state}
    log('memory rank %d: %d parameters (%d dense, %d expert); %s' % (
        dist.get_rank(), dense + expert, dense, expert, ', '.join(
            '%s %d B (formula %d)' % (k, measured[k], expected[k]) for k in measured)),
        all_ranks=True)
    return ['memory: %s %d B on rank %d, formula %d B' % (k, measured[k], dist.get_rank(),
                                                          expected[k])
            for k in measured if abs(measured[k] - expected[k]) > 0.02 * expected[k]]


def sharded_state(model, optimizer, h, iteration, loading=False):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    metadata = {'dp_cp_group': ps.get_data_parallel_group(with_context_parallel=True),
                'singleton_local_shards': False, 'chained_optim_avoid_prefix': True}
    if h.dist_opt:
        metadata['distrib_optim_sharding_type'] = 'dp_reshardable'
    state = {'model': model.module.sharded_state_dict(metadata=metadata)}
    if optimizer is not None:
        # loading: the optimizer must first create its (empty) state so that the template
        # holds the moments to be filled
        state['optimizer'] = optimizer.sharded_state_dict(state, is_loading=loading,
                                                          metadata=metadata)
        # the RNG states as Megatron's training saves them: one object per (pipeline, tensor)
        # rank, replicated over data ranks
        rng = {'torch_rng_state': torch.get_rng_state(),
               'rng_tracker_states': tensor_parallel.get_cuda_rng_tracker().get_states()}
        state['rng_state'] = ShardedObject(
            'rng_state', [rng],
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
            replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    state['iteration'] = iteration
    return state


def save(model, optimizer, h, directory, iteration):
    from megatron.core import dist_checkpointing
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state(model, optimizer, h, iteration), directory)
    dist.barrier()


def prepare_distributed_optimizer_for_load(optimizer):
    """Without Apex or Transformer Engine (torch's AdamW), Megatron-Core 0.19's distributed
    optimizer cannot describe a fresh, never-stepped state (its state_dict asserts a single
    'step'). Give it the dummy state Megatron itself creates for that purpose before a load; the
    load then replaces parameters, moments and step."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    for inner in getattr(optimizer, 'chained_optimizers', [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def restore_distributed_optimizer_step(optimizer):
    """The other half of the torch-AdamW gap: a dp_reshardable load restores the step into the
    param groups, then copies each parameter's 'step' from the load template (a
    LocalNonpersistentObject: the dummy state's 1) over it. Apex/TE's FusedAdam keeps the step in
    the param groups only, so on a GPU there is nothing to restore."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    for inner in getattr(optimizer, 'chained_optimizers', [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            for param in group['params']:
                state = inner.optimizer.state.get(param)
                if state and 'step' in state:
                    state['step'] = torch.tensor(float(group['step']), dtype=torch.float32)


def load(model, optimizer, h, directory):
    from megatron.core import dist_checkpointing
    from megatron.core import tensor_parallel
    if optimizer is not None and h.dist_opt:
        prepare_distributed_optimizer_for_load(optimizer)
    template = sharded_state(model, optimizer, h, 0, loading=True)
    state = dist_checkpointing.load(template, directory)
    model.module.load_state_dict(state['model'])
    if optimizer is not None:
        # no_grad: with fp32 parameters the distributed optimizer's main parameters are views of
        # the model's, and Megatron-Core 0.19 copies into them in place from
        # load_parameter_state_from_dp_reshardable, which (unlike its fs_model_space sibling)
        # is not decorated with @torch.no_grad(): autograd refuses the copy.
        with torch.no_grad():
            optimizer.load_state_dict(state['optimizer'])
        if h.dist_opt:
            restore_distributed_optimizer_step(optimizer)
        rng = state['rng_state'][0]
        torch.set_rng_state(rng['torch_rng_state'])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng['rng_tracker_states'])
    return state['iteration']


def main():
    h = parse_arguments()
    if not h.show_warnings:
        # Megatron and torch warn at import about Apex, Transformer Engine, deprecations and
        # single-process checkpoint reads on every rank: hundreds of lines that hide the checks
        warnings.simplefilter('ignore')
        logging.getLogger('megatron').setLevel(logging.ERROR)
    dist.init_process_group('gloo')
    import mcore_cpu
    mcore_cpu.install()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.package_info import __version__ as mcore_version
    import megatron.core
    ps.initialize_model_parallel(
        tensor_model_parallel_size=h.tp, pipeline_model_parallel_size=h.pp,
        expert_model_parallel_size=h.ep, expert_tensor_parallel_size=h.etp)
    world = dist.get_world_size()
    dp = ps.get_data_parallel_world_size()
    log('megatron-core %s from %s, torch %s, world %d = tensor %d x pipeline %d x data %d; '
        'experts: expert %d x expert-tensor %d x expert-data %d; optimizer %s; moe %s%s' % (
            mcore_version, os.path.dirname(megatron.core.__file__), torch.__version__, world,
            h.tp, h.pp, dp, ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size(), ps.get_expert_data_parallel_world_size(),
            'distributed' if h.dist_opt else 'plain', h.moe,
            ' gate ' + h.gate if h.moe == 'fmoec' else ''))
    if h.global_batch % (h.micro_batch * dp):
        raise SystemExit('global batch %d does not split into micro-batches of %d over %d data '
                         'ranks' % (h.global_batch, h.micro_batch, dp))

    def fresh(seed_offset=0):
        """A new model, DDP wrapper and optimizer (each model gets its own config: Megatron
        deep-copies the config inside layers, and the DDP hooks set on it cannot be copied)."""
        config = transformer_config(h)
        h.seed += seed_offset
        model = wrap_ddp(config, build_model(config, h), h)
        h.seed -= seed_offset
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        return model, build_optimizer(model, h), config

    model, optimizer, config = fresh()
    n_local = sum(p.numel() for p in model.module.parameters())
    log('rank %d: tensor %d pipeline %d data %d expert %d, %d parameters here' % (
        dist.get_rank(), ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(), ps.get_expert_model_parallel_rank(), n_local), all_ranks=True)

    failures = []
    reference = None
    if h.save_init:
        save(model, None, h, h.save_init, 0)
        log('saved the initial model to %s' % h.save_init)
    if h.load_init:
        load(model, None, h, h.load_init)
        with open(os.path.join(h.load_init, 'losses.json')) as f:
            reference = {int(k): v for k, v in json.load(f).items()}
        log('loaded the initial model from %s (resharded to this layout)' % h.load_init)

    round_trip = not h.no_ckpt and 0 < h.save_step < h.steps
    directory = None
    if round_trip:
        holder = [h.ckpt_dir or (tempfile.mkdtemp(prefix='mcore-ckpt-') if dist.get_rank() == 0 else None)]
        dist.broadcast_object_list(holder, src=0)   # one folder for all ranks
        directory = holder[0]
        losses, clip_checks = train(model, optimizer, config, h, 0, h.save_step, 'train')
        save(model, optimizer, h, directory, h.save_step)
        log('saved iteration %d to %s' % (h.save_step, directory))
        more, more_clips = train(model, optimizer, config, h, h.save_step, h.steps, 'train')
        losses.update(more)
        clip_checks += more_clips
    else:
        losses, clip_checks = train(model, optimizer, config, h, 0, h.steps, 'train')
    if h.save_init and dist.get_rank() == 0:
        with open(os.path.join(h.save_init, 'losses.json'), 'w') as f:
            json.dump(losses, f)

    # 1. the loss falls
    if not all(math.isfinite(v) for v in losses.values()):
        failures.append('a loss is not finite')
    if losses[h.steps - 1] >= losses[0]:
        failures.append('the loss did not fall (%.4f -> %.4f)' % (losses[0], losses[h.steps - 1]))
    # 2. clipping triggered and left the norm at the clip value
    if h.clip > 0:
        triggered = [(n, c) for n, c in clip_checks if n > h.clip]
        if not triggered:
            failures.append('clipping never triggered (raise the learning rate or lower --clip)')
        for n, c in triggered:
            if abs(c - h.clip) > 1e-4 * h.clip:
                failures.append('after clipping the norm is %.6f, not %.6f' % (c, h.clip))
        log('check clipping: triggered in %d of %d steps, the clipped norm equals %.3g each time'
            % (len(triggered), len(clip_checks), h.clip))
    # 3. replicas
    problems, (n_dense, n_expert), experts_differ = check_replicas(model)
    failures += problems
    log('check replicas: %d non-expert and %d expert tensors on rank 0; data-parallel replicas '
        'bit-identical: %s; expert replicas bit-identical: %s; experts differ across expert '
        'ranks: %s' % (n_dense, n_expert,
                       not any('data-parallel' in p for p in problems),
                       not any('expert-data' in p for p in problems),
                       'n/a (1 expert rank)' if experts_differ is None else experts_differ))
    # 4. memory: what this rank holds, against the formula
    failures += check_memory(model, optimizer, h)
    # 5. the reference run's losses (same initial weights, same global batches)
    if reference is not None:
        worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in losses)
        log('check against the reference run: largest relative loss difference %.3g '
            '(allowed %.3g)' % (worst, h.loss_tolerance))
        for s in losses:
            log('  step %d: %.6f here, %.6f reference' % (s + 1, losses[s], reference[s]))
        if worst > h.loss_tolerance:
            failures.append('losses differ from the reference run by %.3g' % worst)
    # 6. checkpoint round trip: a fresh model and optimizer (other weights) load the checkpoint
    # saved after step save_step; the remaining steps must give bit-identical losses
    if round_trip:
        model, optimizer, config = fresh(seed_offset=1)
        iteration = load(model, optimizer, h, directory)
        resumed, _ = train(model, optimizer, config, h, iteration, h.steps, 'resumed')
        same = all(resumed[s] == losses[s] for s in resumed)
        log('check resume: steps %d-%d after loading iteration %d give %s losses' % (
            iteration + 1, h.steps, iteration, 'bit-identical' if same else 'DIFFERENT'))
        if not same:
            failures.append('the resumed losses differ')
        problems, _, _ = check_replicas(model)
        failures += problems

    dist.barrier()
    all_failures = [None] * dist.get_world_size()
    dist.all_gather_object(all_failures, failures)
    merged = sorted(set(f for fs in all_failures for f in fs))
    if dist.get_rank() == 0:
        for f in merged:
            print('FAILED: ' + f, flush=True)
        if not merged:
            print('TRAIN_TINY_OK', flush=True)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    sys.exit(1 if merged else 0)


if __name__ == '__main__':
    main()
