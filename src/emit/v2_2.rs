//! The edits that add fmoec's MoE layers to Megatron-LM v2.2 (tree
//! `8aa4619f2b2a57b5725026a50ebd2b15e8121482`; the v2.2 tag is gone).
//!
//! Each edit quotes only the few lines around the change that `git apply` needs; the line
//! numbers and blob ids were recorded from that tree, and `tests/emit_megatron.rs` checks
//! them against a real checkout when `FMOEC_MEGATRON_V22` names one. The added lines only
//! call into the generated module `fmoec_moe`, so the patch is the same for every model.
//!
//! What each file gets:
//! - `megatron/arguments.py`: the MoE argument group (`fmoec_moe.add_arguments`).
//! - `megatron/training.py`: expert-aware checkpoints and data parallelism (imports
//!   replaced), the model provider's output fmoefied in `get_model`, the balance loss's
//!   loss-scale hook at the start of `train_step`, the balance report in `training_log`.
//! - `megatron/optimizer/optimizer.py`: the fp16 optimizer's fp32 copies keep the tag, and its
//!   "found inf" is agreed across the data-parallel ranks too (an overflow only in one rank's
//!   expert gradients must make every rank skip the step).
//! - `megatron/optimizer/clip_grads.py`: `clip_grad_norm_fp32` rebound to fmoec's.

use super::megatron::{Edit, FileEdits, ReleaseEdits};

pub static RELEASE: ReleaseEdits = ReleaseEdits {
    version: "v2.2",
    commit: "8aa4619f2b2a57b5725026a50ebd2b15e8121482",
    files: &[ARGUMENTS, TRAINING, OPTIMIZER, CLIP_GRADS],
};

const ARGUMENTS: FileEdits = FileEdits {
    path: "megatron/arguments.py",
    original_blob: "26a7cec6a035312b4150e832e46ae1aad16cc087",
    patched_blob: "6788b973a8bd7ad46ddac50fe3859044797b2d4a",
    edits: &[Edit {
        line: 41,
        before: &[
            "    parser = _add_autoresume_args(parser)",
            "    parser = _add_realm_args(parser)",
        ],
        remove: &[],
        add: &[
            "",
            "    # MoE layers (fmoec): the generated module's argument group, defaults from the model file.",
            "    import fmoec_moe",
            "    parser = fmoec_moe.add_arguments(parser)",
        ],
        after: &["", "    # Custom arguments."],
    }],
};

const TRAINING: FileEdits = FileEdits {
    path: "megatron/training.py",
    original_blob: "56d1c7c4d0ccb4a1f071995de1099da241143b47",
    patched_blob: "dd03e5525112b5e6d354bcac86dc9cadda91460b",
    edits: &[
        Edit {
            line: 36,
            before: &[
                "from megatron import print_rank_0",
                "from megatron import print_rank_last",
            ],
            remove: &[
                "from megatron.checkpointing import load_checkpoint",
                "from megatron.checkpointing import save_checkpoint",
            ],
            add: &[
                "# fmoec: MoE layers, expert-aware checkpoints and data parallelism (fmoec_moe.py).",
                "import fmoec_moe",
                "from fmoec_moe import load_checkpoint",
                "from fmoec_moe import save_checkpoint",
            ],
            after: &[
                "from megatron.model import FP16Module",
                "from megatron.optimizer import get_megatron_optimizer",
            ],
        },
        Edit {
            line: 44,
            before: &[
                "from megatron.initialize import write_args_to_tensorboard",
                "from megatron.learning_rates import AnnealingLR",
            ],
            remove: &["from megatron.model import DistributedDataParallel as LocalDDP"],
            add: &["from fmoec_moe import DistributedDataParallel as LocalDDP"],
            after: &[
                "from megatron.model.realm_model import ICTBertModel",
                "from megatron.utils import check_adlr_autoresume_termination",
            ],
        },
        Edit {
            line: 181,
            before: &["", "    # Build model on cpu."],
            remove: &["    model = model_provider_func()"],
            add: &["    model = fmoec_moe.fmoefy(model_provider_func())"],
            after: &["", "    # Set tensor model parallel attributes if not set."],
        },
        Edit {
            line: 586,
            before: &["    # Set grad to zero.", "    optimizer.zero_grad()"],
            remove: &[],
            add: &["    fmoec_moe.begin_step(optimizer)"],
            after: &["", "    if mpu.get_pipeline_model_parallel_world_size() > 1:"],
        },
        Edit {
            line: 649,
            before: &["    timers = get_timers()", "    writer = get_tensorboard_writer()"],
            remove: &[],
            add: &["    loss_dict = fmoec_moe.training_log_hook(loss_dict, iteration)"],
            after: &["", "    # Advanced, skipped, and Nan iterations."],
        },
    ],
};

const OPTIMIZER: FileEdits = FileEdits {
    path: "megatron/optimizer/optimizer.py",
    original_blob: "9d42260d6b9358ff53d05e7b604b267b1f66a41c",
    patched_blob: "1f06501e1e1475c1deca4091757cabbfcf05c6e5",
    edits: &[
        Edit {
            line: 27,
            before: &[
                "from megatron import mpu",
                "from megatron import print_rank_0",
            ],
            remove: &[],
            add: &["import fmoec_moe"],
            after: &["", "from .clip_grads import clip_grad_norm_fp32"],
        },
        Edit {
            line: 176,
            before: &[
                "                        mpu.copy_tensor_model_parallel_attributes(main_param,",
                "                                                                  param)",
            ],
            remove: &[],
            add: &["                        fmoec_moe.copy_param_tags(main_param, param)"],
            after: &[
                "                        if hasattr(param, 'shared'):",
                "                            main_param.shared = param.shared",
            ],
        },
        Edit {
            line: 256,
            before: &[
                "                                     op=torch.distributed.ReduceOp.MAX,",
                "                                     group=mpu.get_model_parallel_group())",
            ],
            remove: &[],
            add: &[
                "        # fmoec: expert gradients are not reduced across data ranks; agree there too.",
                "        fmoec_moe.agree_found_inf(self.found_inf)",
            ],
            after: &["", "        # Check for nan."],
        },
    ],
};

const CLIP_GRADS: FileEdits = FileEdits {
    path: "megatron/optimizer/clip_grads.py",
    original_blob: "e8d0d0256b4cdddc3e2b4bf6d3b771ac0a7a58bc",
    patched_blob: "a41cbf43347c5b2b53ffbeaa5a0adacc207adf61",
    edits: &[Edit {
        line: 118,
        before: &["", "    return total_norm"],
        remove: &[],
        add: &[
            "",
            "",
            "# fmoec: clipping over all distinct parameters, experts summed across the expert group",
            "# (2-norm and inf-norm), every collective entered by every rank of its group.",
            "from fmoec_moe import clip_grad_norm_fp32  # noqa: E402,F811",
        ],
        after: &[],
    }],
};
