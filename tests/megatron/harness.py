"""Trains a tiny GPT with fmoec's MoE layers inside a patched Megatron-LM v2.2, v2.5 or v3.0.2
on CPU ranks (gloo), and checks what the emitted integration promises.

Run it from the root of a Megatron-LM tree patched with `fmoec emit`'s patch, with the emitted
folder on PYTHONPATH:

    PYTHONPATH=out torchrun --nproc_per_node=4 tests/megatron/harness.py --tp 2 --steps 4 \\
        --ckpt-dir "$(mktemp -d)" --overflow 2:1 --clip-grad 0.05 --fp16 --initial-loss-scale 1024

Derived from the shared harness (`shared/megatron-harness/tiny_gpt_v2x.py` and
`tiny_gpt_v25_v30.py`, which stay as they are); what this copy adds and why:
- one script for the three releases (the version is read from Megatron's own signatures);
- no FastMoE wrapping of the model provider (fmoec's patched `get_model` fmoefies);
- `--overflow STEP:DATA_RANK`: an inf in one expert gradient of one data rank at one step (the
  overflow only that rank sees, since expert gradients are not reduced across data ranks);
- checks after the steps: the LM loss is finite and the same on every tensor rank, every rank
  skipped exactly the steps with an overflow, clipping triggered where asked, non-expert parameters are bit-identical across
  data-parallel replicas and expert parameters differ between expert ranks, and (with
  `--ckpt-dir`) a save / scramble / load round trip restores every parameter bit for bit.
Every rank prints one `[rank R] ...` summary; rank 0 prints HARNESS_OK when all checks pass.
`HANG_DUMP_S=60` dumps every stack and exits if a rank hangs (what a deadlock looks like).

Needs torch 2.x, numpy, six and regex, and the shared harness's `cpu_shim.py` and `stubs/`
(found at `FMOEC_MEGATRON_HARNESS`, else `../shared/megatron-harness` beside this repository).
"""
import argparse
import inspect
import json
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get('FMOEC_MEGATRON_HARNESS') or os.path.normpath(
    os.path.join(HERE, '..', '..', '..', 'shared', 'megatron-harness'))
sys.path.insert(0, SHARED)
import cpu_shim  # noqa: E402

cpu_shim.install()
import faulthandler  # noqa: E402

if os.environ.get('HANG_DUMP_S'):
    faulthandler.dump_traceback_later(int(os.environ['HANG_DUMP_S']), exit=True)
import torch  # noqa: E402

sys.path.insert(0, os.getcwd())  # the Megatron tree

ap = argparse.ArgumentParser()
ap.add_argument('--tp', type=int, default=1)
ap.add_argument('--pp', type=int, default=1)
ap.add_argument('--steps', type=int, default=3)
ap.add_argument('--mbs', type=int, default=2)
ap.add_argument('--ckpt-dir', default=None, help='save, scramble, load, compare')
ap.add_argument('--overflow', default=None, metavar='STEP:DATA_RANK',
                help='put an inf into one expert gradient of this data rank at this step (0-based)')
ap.add_argument('--expect-clipping', action='store_true',
                help='fail unless the gradient norm exceeded --clip-grad on every unskipped step')
h, extra = ap.parse_known_args()
world = int(os.environ.get('WORLD_SIZE', '1'))
rank = int(os.environ.get('RANK', '0'))
dp = world // (h.tp * h.pp)
gbs = h.mbs * dp * (2 if h.pp > 1 else 1)
overflow_step, overflow_rank = (None, None)
if h.overflow:
    overflow_step, overflow_rank = (int(v) for v in h.overflow.split(':'))

tok = tempfile.mkdtemp()
vocab = {'<|endoftext|>': 0}
vocab.update({chr(97 + i): i + 1 for i in range(26)})
with open(os.path.join(tok, 'vocab.json'), 'w') as f:
    json.dump(vocab, f)
with open(os.path.join(tok, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n')
SEQ = 16


with open(os.path.join(os.getcwd(), 'megatron', 'training.py')) as f:
    _training = f.read()
VERSION = ('v3.0.2' if 'model_type=ModelType' in _training else
           'v2.5' if 'grad_norm, params_norm' in _training else 'v2.2')
fusion_off = '--no-scaled-masked-softmax-fusion' if VERSION == 'v2.2' else '--no-masked-softmax-fusion'
sys.argv = [sys.argv[0],
            '--num-layers', '2', '--hidden-size', '64', '--num-attention-heads', '4',
            '--seq-length', str(SEQ), '--max-position-embeddings', str(SEQ),
            '--micro-batch-size', str(h.mbs), '--global-batch-size', str(gbs),
            '--train-iters', '10', '--lr', '1e-3', '--min-lr', '1e-4', '--lr-decay-style', 'constant',
            '--clip-grad', '1.0', '--log-interval', '1', '--seed', '1234',
            '--tokenizer-type', 'GPT2BPETokenizer', '--vocab-file', os.path.join(tok, 'vocab.json'),
            '--merge-file', os.path.join(tok, 'merges.txt'),
            '--tensor-model-parallel-size', str(h.tp), '--pipeline-model-parallel-size', str(h.pp),
            '--distributed-backend', 'nccl' if torch.cuda.is_available() else 'gloo',
            fusion_off, '--DDP-impl', 'local'] + extra

from megatron import mpu, get_args  # noqa: E402

cpu_shim.patch_megatron_rng()
from megatron.global_vars import set_global_variables  # noqa: E402

set_global_variables(args_defaults={})
args = get_args()
torch.distributed.init_process_group(backend=args.distributed_backend, world_size=world, rank=rank)
cpu_shim.patch_dist()
mpu.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
torch.manual_seed(args.seed + 100 * mpu.get_pipeline_model_parallel_rank())
mpu.model_parallel_cuda_manual_seed(args.seed + 100 * mpu.get_pipeline_model_parallel_rank())

import pretrain_gpt  # noqa: E402
import megatron.training as T  # noqa: E402

if VERSION == 'v3.0.2':
    from megatron.model import ModelType
    model, optimizer, sched = T.setup_model_and_optimizer(pretrain_gpt.model_provider,
                                                          ModelType.encoder_or_decoder)
else:
    model, optimizer, sched = T.setup_model_and_optimizer(pretrain_gpt.model_provider)
chunks = model if isinstance(model, list) else [model]
data_rank = mpu.get_data_parallel_rank()


def named_params():
    for i, chunk in enumerate(chunks):
        for n, p in chunk.named_parameters():
            yield '{}.{}'.format(i, n), p


def is_expert(p):
    return getattr(p, 'dp_comm', 'dp') in ('none', 'expert_dp')


# The injected overflow: after the data-parallel reduction, before the optimizer looks at the
# gradients, one expert gradient of one data rank gets an inf.
step_now = [0]
_step = optimizer.step


def step_with_overflow(*a, **k):
    if step_now[0] == overflow_step and data_rank == overflow_rank:
        for _, p in named_params():
            if is_expert(p):
                for g in (getattr(p, 'main_grad', None), p.grad):
                    if g is not None:
                        g.view(-1)[0] = float('inf')
                break
    return _step(*a, **k)


optimizer.step = step_with_overflow

# The gradient norm each step computed (v2.2's train_step does not return it): the optimizer
# calls the clipping function by the name its module imported.
norms = []
import megatron.optimizer.optimizer as _optimizer_module  # noqa: E402
_clip = _optimizer_module.clip_grad_norm_fp32


def clip_and_record(*a, **k):
    norm = _clip(*a, **k)
    norms.append(float(norm))
    return norm


_optimizer_module.clip_grad_norm_fp32 = clip_and_record

g = torch.Generator().manual_seed(1000 + data_rank)


def batches():
    while True:
        yield {'text': torch.randint(1, 27, (args.micro_batch_size, SEQ + 1), generator=g)}


it = batches()
total = {}
skipped_steps, losses = [], []
for step in range(h.steps):
    step_now[0] = step
    out = T.train_step(pretrain_gpt.forward_step, it, model, optimizer, sched)
    loss_dict, skipped = out[0], out[1]
    args.consumed_train_samples += gbs
    if VERSION == 'v2.2':
        T.training_log(loss_dict, total, optimizer.param_groups[0]['lr'], step + 1,
                       optimizer.get_loss_scale().item(), False, skipped)
    else:
        T.training_log(loss_dict, total, optimizer.param_groups[0]['lr'], step + 1,
                       optimizer.get_loss_scale().item(), False, skipped, out[2], None, out[3])
    if skipped:
        skipped_steps.append(step)
    if loss_dict:
        losses.append(float(loss_dict['lm loss']))
        print('[rank {}] {} step {} loss {:.4f} skipped {} loss scale {}'.format(
            rank, VERSION, step, losses[-1], skipped, optimizer.get_loss_scale().item()), flush=True)

failures = []
# Tensor-parallel ranks compute one loss: every rank of a tensor group reports the same.
if h.tp > 1 and losses:
    mine = torch.tensor(losses, dtype=torch.float64)
    theirs = [torch.empty_like(mine) for _ in range(h.tp)]
    torch.distributed.all_gather(theirs, mine, group=mpu.get_tensor_model_parallel_group())
    if not all(torch.equal(t, mine) for t in theirs):
        failures.append('tensor ranks report different losses: {}'.format([t.tolist() for t in theirs]))
if losses and not all(math.isfinite(v) for v in losses):
    failures.append('non-finite LM loss {}'.format(losses))
expected_skips = [overflow_step] if overflow_step is not None and overflow_step < h.steps else []
if skipped_steps != expected_skips:
    failures.append('skipped steps {} (expected {})'.format(skipped_steps, expected_skips))
clip = float(args.clip_grad)
clipped = [n for n in norms if n > clip]
if h.expect_clipping and clip > 0 and len(clipped) < h.steps - len(expected_skips):
    failures.append('clipping did not trigger: norms {} with --clip-grad {}'.format(norms, clip))

# Invariants across data-parallel ranks: replicas bit-identical, experts different.
dpg = mpu.get_data_parallel_group()
drift, expert_equal, expert_count = [], 0, 0
if dp > 1:
    for n, p in named_params():
        xs = [torch.empty_like(p.data) for _ in range(dp)]
        torch.distributed.all_gather(xs, p.data.contiguous(), group=dpg)
        if is_expert(p):
            expert_count += 1
            if getattr(p, 'dp_comm', 'dp') == 'none' and all(torch.equal(x, xs[0]) for x in xs[1:]):
                if float(xs[0].abs().max()) > 0:   # zero-initialised biases may stay equal
                    expert_equal += 1
            continue
        d = max(float((x.float() - xs[0].float()).abs().max()) for x in xs)
        if d > 0:
            drift.append((n, d))
    if drift:
        failures.append('{} non-expert parameters drifted across data ranks: {}'.format(len(drift), drift[:3]))
    if expert_count == 0:
        failures.append('no expert parameters on this rank')
    elif expert_equal:
        failures.append('{} expert weights are equal on every data rank'.format(expert_equal))
torch.distributed.barrier()

ckpt = 'not run'
if h.ckpt_dir:
    args.save = args.load = h.ckpt_dir
    T.save_checkpoint(h.steps, model, optimizer, sched)
    ref = {n: p.detach().clone() for n, p in named_params()}
    main_ref = [p.detach().clone() for group in optimizer.optimizer.param_groups for p in group['params']]
    with torch.no_grad():
        for _, p in named_params():
            p.add_(1.0)
        for group in optimizer.optimizer.param_groups:
            for p in group['params']:
                p.add_(1.0)
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    loaded = T.load_checkpoint(model, optimizer, sched)
    bad = [n for n, p in named_params() if not torch.equal(p.detach(), ref[n])]
    main = [p for group in optimizer.optimizer.param_groups for p in group['params']]
    bad_main = sum(1 for p, r in zip(main, main_ref) if not torch.equal(p.detach(), r))
    ckpt = 'iteration {} mismatched params {} mismatched optimizer params {}'.format(loaded, len(bad), bad_main)
    if bad or bad_main or loaded != h.steps:
        failures.append('checkpoint round trip: {} {}'.format(ckpt, bad[:3]))
    torch.distributed.barrier()

print('[rank {}] {} tp {} pp {} dp {}: skipped {}, norms {}, clip {} ({} clipped), drifted {}, '
      'experts equal across data ranks {}/{}, checkpoint {}; {}'.format(
          rank, VERSION, h.tp, h.pp, dp, skipped_steps, ['{:.3g}'.format(n) for n in norms], clip,
          len(clipped), len(drift), expert_equal, expert_count, ckpt,
          'FAILED: ' + '; '.join(failures) if failures else 'ok'), flush=True)
ok = torch.tensor([0 if failures else 1])
torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
if rank == 0 and int(ok.item()) == 1:
    print('HARNESS_OK', flush=True)
torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
# os._exit, not sys.exit: now and then a C++ thread of torch 2.11's gloo backend is still
# joinable when the interpreter tears down and aborts the process ("terminate called without an
# active exception") after every check above has passed and been printed.
os._exit(0 if not failures else 1)
