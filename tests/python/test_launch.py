"""The emitted train.sh starts every rank under the torch it finds (here torch 2.x), in the form
Megatron-LM's parser accepts: it knows `--local_rank` and rejects `--local-rank`, which torch
2.x's torch.distributed.launch passes. A stand-in pretrain_gpt.py parses like Megatron and
records what each rank was given."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import MODULE_DIR

FAKE_PRETRAIN = r'''
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument('--local_rank', type=int, default=None)   # as Megatron-LM v2.2 to v3.0.2
args, unknown = parser.parse_known_args()
bad = [a for a in unknown if a.startswith('--local')]
if bad:
    sys.exit('pretrain_gpt.py: error: unrecognized arguments: ' + ' '.join(bad))
env = {k: os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'PYTHONPATH')}
with open('rank{}.json'.format(os.environ['RANK']), 'w') as f:
    json.dump({'env': env, 'argv': sys.argv[1:]}, f)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _launch(extra_env):
    work = tempfile.mkdtemp()
    with open(os.path.join(work, 'pretrain_gpt.py'), 'w') as f:
        f.write(FAKE_PRETRAIN)
    env = dict(os.environ)
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', ''),
               PYTHON=sys.executable, MASTER_PORT=str(_free_port()),
               DATA_PATH='corpus_text_document', VOCAB_FILE='vocab.json', MERGE_FILE='merges.txt')
    env.update(extra_env)
    out = subprocess.run(['bash', os.path.join(MODULE_DIR, 'train.sh'), '--extra-flag'], cwd=work,
                         env=env, capture_output=True, text=True, timeout=240)
    ranks = sorted(n for n in os.listdir(work) if n.startswith('rank'))
    seen = [json.load(open(os.path.join(work, n))) for n in ranks]
    shutil.rmtree(work)
    return out, seen


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
def test_train_sh_starts_every_rank_under_torch_2():
    out, seen = _launch({'NPROC_PER_NODE': '2'})
    assert out.returncode == 0, out.stdout + out.stderr
    with open(os.path.join(MODULE_DIR, 'train.sh')) as f:
        planned = int(re.search(r'was planned for (\d+)', f.read()).group(1))
    if planned != 2:    # fewer or more ranks than planned: said, not refused
        assert 'the model file was planned for {}'.format(planned) in out.stderr
    assert [s['env']['RANK'] for s in seen] == ['0', '1']
    for s in seen:
        assert s['env']['WORLD_SIZE'] == '2' and s['env']['MASTER_ADDR'] == 'localhost'
        assert s['env']['PYTHONPATH'].split(os.pathsep)[0] == MODULE_DIR
        argv = s['argv']
        assert argv[argv.index('--data-path') + 1] == 'corpus_text_document'
        assert argv[-1] == '--extra-flag'
        assert not any(a.startswith('--local') for a in argv)


def test_train_sh_needs_master_addr_on_several_nodes():
    out, seen = _launch({'NNODES': '2', 'NODE_RANK': '1'})
    assert out.returncode == 2 and 'set MASTER_ADDR' in out.stderr
    assert seen == []
