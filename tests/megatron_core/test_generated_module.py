"""pytest suite of the module `fmoec emit --megatron core_v0.19` generates, inside Megatron-Core.

Owns: running the generated fmoec_moe.py (the folder FMOEC_MODULE_DIR) in a real Megatron-Core
training on CPU ranks with gloo: train_tiny.py (Megatron-Core's parallel_state, GPTModel from the
module's layer spec, its DDP, optimizer with clipping, pipeline schedules, dist_checkpointing)
with the module's layer in place of Megatron's MLP. Each run checks that the loss falls, that
clipping acted, that replicas are bit-identical and expert ranks differ, the memory the rank
holds, and that a checkpoint resumes bit-identically; with a reference, that the one-rank model,
saved by dist_checkpointing and resharded into the layout, gives the reference's losses. Must not
know the module's insides: it is imported as `fmoec_moe`, as `--spec fmoec_moe ...` does.

Megatron-Core comes from FMOEC_MEGATRON_CORE_PKG: a folder holding `megatron/core` (PyPI's
megatron-core 0.19.0 wheel unzipped, or a checkout at tag core_v0.19.0). Run by
tests/compiler/emit_python.rs; by hand:

    FMOEC_MODULE_DIR=out FMOEC_MEGATRON_CORE_PKG=/tmp/mcore python -m pytest tests/megatron_core
"""
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.environ.get('FMOEC_MODULE_DIR')
PACKAGE = os.environ.get('FMOEC_MEGATRON_CORE_PKG')
if not MODULE_DIR or not os.path.isfile(os.path.join(MODULE_DIR, 'fmoec_moe.py')):
    raise pytest.UsageError('set FMOEC_MODULE_DIR to a folder with the fmoec_moe.py of '
                            '`fmoec emit --megatron core_v0.19`')
if not PACKAGE or not os.path.isdir(os.path.join(PACKAGE, 'megatron', 'core')):
    raise pytest.UsageError('set FMOEC_MEGATRON_CORE_PKG to a folder holding megatron/core '
                            '(the megatron-core 0.19.0 wheel unzipped)')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train(ranks, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([MODULE_DIR, PACKAGE]),
               MEGATRON_LM=PACKAGE, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(ranks),
         '--master_port', str(_free_port()), os.path.join(HERE, 'train_tiny.py'),
         '--moe', 'fmoec'] + list(args),
        env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and 'TRAIN_TINY_OK' in proc.stdout, out[-6000:]
    return out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The one-rank run: its initial model saved by dist_checkpointing, its losses beside it."""
    path = str(tmp_path_factory.mktemp('reference'))
    train(1, '--gate', 'naive', '--no-ckpt', '--save-init', path)
    return path


@pytest.mark.parametrize('ranks,layout', [
    (2, ['--ep', '2']),
    (4, ['--tp', '2', '--ep', '2', '--dist-opt']),
    (2, ['--pp', '2']),
], ids=['expert2', 'tensor2-expert2-distopt', 'pipeline2'])
def test_resharded_reference_trains_alike_and_resumes(reference, ranks, layout):
    out = train(ranks, '--gate', 'naive', '--load-init', reference, *layout)
    assert 'check resume: steps 4-6 after loading iteration 3 give bit-identical losses' in out
    assert 'check clipping: triggered in 6 of 6 steps' in out


@pytest.mark.parametrize('gate', ['gshard', 'switch'])
def test_capacity_gates_train_and_resume_across_expert_ranks(gate):
    out = train(2, '--gate', gate, '--ep', '2')
    assert 'bit-identical losses' in out
