"""Record the process groups Megatron-LM v2.2's own `initialize_model_parallel` creates,
with torch.distributed replaced by a recorder, for every world size up to 16 and every
valid (tensor, pipeline). Writes the JSON that tests/compiler/plan_megatron.rs compares with.

usage: python tests/megatron/v22_groups.py MEGATRON_V2_2/megatron/mpu/initialize.py > tests/megatron/v22_groups.json
(Megatron-LM commit 8aa4619f2b2a57b5725026a50ebd2b15e8121482; needs torch only to import.)
"""
import contextlib
import importlib.util
import io
import json
import sys
import types


def record(path, world, tp, pp):
    pkg = types.ModuleType("_fmoec_v22")
    pkg.__path__ = []
    utils = types.ModuleType("_fmoec_v22.utils")
    utils.ensure_divisibility = lambda a, b: None
    sys.modules["_fmoec_v22"] = pkg
    sys.modules["_fmoec_v22.utils"] = utils
    spec = importlib.util.spec_from_file_location("_fmoec_v22.initialize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    created = []
    mod.torch = types.SimpleNamespace(distributed=types.SimpleNamespace(
        get_rank=lambda: 0, get_world_size=lambda: world, is_initialized=lambda: True,
        new_group=lambda ranks: created.append(list(ranks)) or len(created)))
    with contextlib.redirect_stdout(io.StringIO()):  # v2.2 prints on rank 0
        mod.initialize_model_parallel(tp, pp)
    return created


def main():
    path = sys.argv[1]
    out = []
    for world in range(1, 17):
        for tp in range(1, world + 1):
            for pp in range(1, world // tp + 1):
                if world % (tp * pp) == 0:
                    out.append({"world": world, "tensor": tp, "pipeline": pp,
                                "new_group_calls": record(path, world, tp, pp)})
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
