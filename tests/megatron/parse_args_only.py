"""A stand-in for Megatron-LM's pretrain_gpt.py that only runs the release's own `parse_args`
(with fmoec's argument group, from the patched tree at MEGATRON_TREE) on every rank train.sh
starts, and prints what it parsed (the layout, the data and tokenizer files, and the checkpoint
folders).
tests/compiler/emit_megatron.rs copies it as pretrain_gpt.py next to an emitted train.sh: the
launch and every argument train.sh passes must be accepted as they are.
Needs the shared harness's cpu_shim (FMOEC_MEGATRON_HARNESS) to import Megatron on a CPU."""
import os
import sys

sys.path.insert(0, os.environ['FMOEC_MEGATRON_HARNESS'])
import cpu_shim  # noqa: E402

cpu_shim.install()
sys.path.insert(0, os.environ['MEGATRON_TREE'])
from megatron.arguments import parse_args  # noqa: E402

args = parse_args()
print('PARSED rank {} of {}: tp {} pp {} dp {} micro {} global {} layers {} fmoe_layers {} '
      'fp16 {} bf16 {} ffn {}'.format(
          args.rank, args.world_size, args.tensor_model_parallel_size,
          args.pipeline_model_parallel_size, args.data_parallel_size, args.micro_batch_size,
          args.global_batch_size, args.num_layers, args.fmoe_layers, args.fp16,
          getattr(args, 'bf16', None), getattr(args, 'ffn_hidden_size', None)), flush=True)
# the files, as Megatron received them (train.sh runs in the checkout: relative paths would be
# read from there)
print('FILES rank {}: data_path {!r} vocab_file {!r} merge_file {!r} save {!r} load {!r}'.format(
    args.rank, args.data_path, args.vocab_file, args.merge_file, args.save, args.load),
    flush=True)
