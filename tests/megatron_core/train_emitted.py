"""Trains an emitted core_v0.19 folder with Megatron-LM's own pretrain_gpt.py on CPU ranks, then
resumes it from its mid-run checkpoint, and checks the two against each other.

Owns: running the emitted `train.sh` twice with pretrain_cpu.py as its training script (mock
data, dropout off so that a resume is deterministic on a CPU, where the "GPU" generator is the CPU
one): (1) ITERS iterations from scratch saving a torch_dist checkpoint every ITERS/2, (2) a fresh
start loading that run's checkpoint of iteration ITERS/2 (`--ckpt-step`) and training to ITERS.
Checks, from Megatron's own log lines: every iteration has a finite LM loss, the gradient norm
Megatron prints (before clipping) exceeds the emitted `--clip-grad` at least once (clipping acted),
and the resumed iterations give the uninterrupted run's gradient norms and its LM loss at the
first resumed and the last iteration (Megatron's loop prints the second resumed iteration's
loss differently after a resume, with its own MoE as with the fmoec layer: NOTES.md section 4).
Must not know the model: the arguments are train.sh's.

    fmoec emit --megatron core_v0.19 model.fmoe -o out
    MEGATRON_LM=/tmp/megatron-lm-core_v0.19.0 python train_emitted.py out --nproc 2

Prints the losses and `TRAIN_EMITTED_OK` when every check holds (exit status 0).
"""
import argparse
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LINE = re.compile(r'iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([-+.\dEe]+|nan|inf).*?grad norm: '
                  r'([-+.\dEe]+|nan|inf)')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def emitted_clip(train_sh):
    with open(train_sh) as f:
        found = re.search(r'--clip-grad ([-+.\dEe]+)', f.read())
    return float(found.group(1)) if found else 0.0


def run(out, nproc, extra, log_path):
    env = dict(os.environ, PRETRAIN=os.path.join(HERE, 'pretrain_cpu.py'), MOCK_DATA='1',
               NNODES='1', NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()),
               PYTHON=os.environ.get('PYTHON', sys.executable))
    with open(log_path, 'w') as log:
        proc = subprocess.run(['bash', os.path.join(out, 'train.sh')] + extra, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as f:
        text = f.read()
    if proc.returncode != 0:
        sys.stdout.write(text[-4000:])
        raise SystemExit('train.sh %s exited with %d (log: %s)' % (' '.join(extra),
                                                                    proc.returncode, log_path))
    return {int(i): (float(loss), float(norm)) for i, loss, norm in LINE.findall(text)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('out', help='a folder written by `fmoec emit --megatron core_v0.19`')
    ap.add_argument('--nproc', type=int, required=True, help='processes (the planned world)')
    ap.add_argument('--iters', type=int, default=6, help='iterations (even; saved at half)')
    ap.add_argument('--keep', action='store_true', help='keep the checkpoints and logs')
    h = ap.parse_args()
    if h.iters < 2 or h.iters % 2:
        raise SystemExit('--iters must be even and at least 2')
    half = h.iters // 2
    clip = emitted_clip(os.path.join(h.out, 'train.sh'))
    work = tempfile.mkdtemp(prefix='fmoec-mcore-train-')
    common = ['--train-iters', str(h.iters), '--save-interval', str(half), '--eval-iters', '0',
              '--log-interval', '1', '--hidden-dropout', '0', '--attention-dropout', '0',
              '--ckpt-format', 'torch_dist']
    first_dir, second_dir = os.path.join(work, 'first'), os.path.join(work, 'resumed')
    first = run(h.out, h.nproc, common + ['--save', first_dir, '--load', first_dir],
                os.path.join(work, 'first.log'))
    resumed = run(h.out, h.nproc, common + ['--save', second_dir, '--load', first_dir,
                                            '--ckpt-step', str(half)],
                  os.path.join(work, 'resumed.log'))
    problems = []
    for i in range(1, h.iters + 1):
        a = first.get(i)
        b = resumed.get(i) if i > half else None
        print('iteration %d: lm loss %s, grad norm %s%s' % (
            i, a[0] if a else '-', a[1] if a else '-',
            '   resumed: lm loss %s, grad norm %s' % b if b else ''))
        if a is None or not math.isfinite(a[0]):
            problems.append('iteration %d: no finite loss in the first run' % i)
        if i > half and b is None:
            problems.append('iteration %d: missing after the resume' % i)
    if sorted(i for i in resumed) != list(range(half + 1, h.iters + 1)):
        problems.append('the resumed run trained iterations %s, not %d-%d (did it load the '
                        'checkpoint?)' % (sorted(resumed), half + 1, h.iters))
    if clip > 0 and not any(norm > clip for _, norm in first.values()):
        problems.append('no gradient norm above --clip-grad %g: clipping never acted' % clip)
    for i in range(half + 1, h.iters + 1):
        if i in first and i in resumed and first[i][1] != resumed[i][1]:
            problems.append('iteration %d: grad norm %g after the resume, %g without' % (
                i, resumed[i][1], first[i][1]))
    for i in (half + 1, h.iters):
        if i in first and i in resumed and first[i][0] != resumed[i][0]:
            problems.append('iteration %d: lm loss %r after the resume, %r without' % (
                i, resumed[i][0], first[i][0]))
    print('clipping at %g: %d of %d iterations above it' % (
        clip, sum(norm > clip for _, norm in first.values()), len(first)))
    for p in problems:
        print('PROBLEM: ' + p)
    if h.keep or problems:
        print('logs and checkpoints kept in %s' % work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print('TRAIN_EMITTED_OK' if not problems else 'FAILED', flush=True)
    sys.exit(1 if problems else 0)


if __name__ == '__main__':
    main()
