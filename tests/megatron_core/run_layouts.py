"""Runs train_tiny.py in every layout the Megatron-Core target must support and prints a table.

Owns: the list of layouts and the order of runs (a one-rank reference run saves its initial model
and losses; each layout loads that model, resharded by dist_checkpointing, and must reproduce the
losses), and the summary. Must not know how a training works (train_tiny.py) or how a MoE layer
works (Megatron's or fmoec_moe.py).

    python run_layouts.py                    # Megatron-Core's own MoE and the fmoec layer
    python run_layouts.py --moe native       # one of them
    python run_layouts.py --quick            # the three required layouts, naive gate (8 runs)

Runs with the Python of this interpreter (`python -m torch.distributed.run`). Exit status 0 when
every run printed TRAIN_TINY_OK.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, 'train_tiny.py')

# (label, processes, arguments): expert 2, tensor 2 x expert 2 and pipeline 2 are required
LAYOUTS = [
    ('expert 2', 2, ['--ep', '2']),
    ('tensor 2 x expert 2', 4, ['--tp', '2', '--ep', '2']),
    ('pipeline 2', 2, ['--pp', '2']),
    ('pipeline 2 x expert 2', 4, ['--pp', '2', '--ep', '2']),
    ('expert 2, distributed optimizer', 2, ['--ep', '2', '--dist-opt']),
    ('tensor 2 x expert 2, distributed optimizer', 4, ['--tp', '2', '--ep', '2', '--dist-opt']),
]
QUICK = {'expert 2', 'tensor 2 x expert 2', 'pipeline 2'}
# fmoec gates whose draws or capacities depend on how tokens are spread over ranks: trained and
# resumed in two layouts, not compared with the one-rank reference
OTHER_GATES = ['gshard', 'noisy', 'switch', 'swipe']


def run(label, procs, args, port):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=%d' % procs,
           '--master_port=%d' % port, TRAIN] + args
    env = dict(os.environ, OMP_NUM_THREADS='1')
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.time() - start
    out = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and 'TRAIN_TINY_OK' in out
    interesting = [line for line in out.splitlines()
                   if re.match(r'(megatron-core|train step|resumed step|check|FAILED|saved the'
                               r'|\[rank 0\] memory)', line)]
    print('== %s (%d processes): %s' % (label, procs, ' '.join(args)), flush=True)
    for line in interesting:
        print('   ' + line, flush=True)
    if not ok:
        print('   exit status %d; last lines:' % proc.returncode)
        for line in out.splitlines()[-25:]:
            print('   | ' + line)
    print('   -> %s in %.0f s' % ('OK' if ok else 'FAILED', elapsed), flush=True)
    return ok, elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--moe', choices=('native', 'fmoec', 'both'), default='both')
    ap.add_argument('--quick', action='store_true',
                    help='only the three required layouts, naive gate (8 runs instead of 24)')
    ap.add_argument('--port', type=int, default=29631)
    h = ap.parse_args()
    results = []
    port = h.port
    work = tempfile.mkdtemp(prefix='mcore-layouts-')
    kinds = ['native', 'fmoec'] if h.moe == 'both' else [h.moe]
    for moe in kinds:
        base = ['--moe', moe]
        if moe == 'fmoec':
            base += ['--gate', 'naive']
        init = os.path.join(work, 'init-' + moe)
        results.append(('%s: one-rank reference' % moe,) + run(
            '%s: one-rank reference' % moe, 1, base + ['--save-init', init, '--no-ckpt'], port))
        port += 1
        for label, procs, args in LAYOUTS:
            if h.quick and label not in QUICK:
                continue
            name = '%s: %s' % (moe, label)
            results.append((name,) + run(name, procs, base + args + ['--load-init', init], port))
            port += 1
        if moe == 'fmoec' and not h.quick:
            # gshard without random routing keeps the balance loss and capacity but no draws:
            # at tensor 1 its routing is layout-independent, so it is compared too
            init = os.path.join(work, 'init-gshard')
            gshard = ['--moe', 'fmoec', '--gate', 'gshard', '--no-random-routing']
            name = 'fmoec gshard (no random routing): one-rank reference'
            results.append((name,) + run(name, 1, gshard + ['--save-init', init, '--no-ckpt'],
                                         port))
            port += 1
            name = 'fmoec gshard (no random routing): expert 2'
            results.append((name,) + run(name, 2, gshard + ['--ep', '2', '--load-init', init],
                                         port))
            port += 1
            for gate in OTHER_GATES:
                for label, procs, args in LAYOUTS[:2]:
                    name = 'fmoec %s: %s' % (gate, label)
                    results.append((name,) + run(
                        name, procs, ['--moe', 'fmoec', '--gate', gate] + args, port))
                    port += 1
    print('\nsummary')
    for name, ok, elapsed in results:
        print('  %-60s %-6s %4.0f s' % (name, 'OK' if ok else 'FAILED', elapsed))
    failed = [r for r in results if not r[1]]
    print('%d runs, %d failed' % (len(results), len(failed)))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
