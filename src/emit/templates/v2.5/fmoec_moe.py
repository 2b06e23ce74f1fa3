{% extends "shared/fmoec_moe.py" %}
{%- block patch_calls %}
  add_arguments(parser)                       megatron/arguments.py
  fmoefy(model)                               megatron/training.py, get_model (every model chunk)
  local_ddp(module, fp32_grads, buffers)      megatron/training.py, get_model (LocalDDP's place)
  save_checkpoint, load_checkpoint            megatron/training.py
  begin_step(optimizer)                       megatron/training.py, train_step
  training_log_hook(loss_dict, iteration)     megatron/training.py, training_log
  copy_param_tags(main_param, param)          megatron/optimizer/optimizer.py
  agree_found_inf(found_inf)                  megatron/optimizer/optimizer.py, fp16 overflow check
  clip_grad_norm_fp32                         megatron/optimizer/clip_grads.py

The balance loss needs no change to megatron/schedules.py: each MoE layer attaches its gradient
to its output (`_AttachBalanceLoss`), so it enters wherever the schedule runs a backward.
{%- endblock %}
{%- block data_parallel -%}
_LOCAL_DDP = []


def local_ddp(module, accumulate_allreduce_grads_in_fp32=False, use_contiguous_buffers=False):
    """Megatron's LocalDDP for one model chunk, as a subclass of it (so every `isinstance` and
    `unwrap_model` of Megatron's sees its own class) whose gradient reduction follows each
    parameter's tag (`dp_comm`). Megatron's grad buffers, `main_grad` and fp32 accumulation are
    its own; the class is made on first use, so this module imports without Megatron."""
    if not _LOCAL_DDP:
        from megatron.model.distributed import DistributedDataParallel as MegatronDDP

        class ExpertAwareDDP(MegatronDDP):
            def allreduce_gradients(self):
                params = [p for p in self.module.parameters() if p.requires_grad]
                if self._grad_buffers is None:
                    # without contiguous buffers Megatron's gradient is param.grad (its own DDP
                    # does the same); a parameter no token reached still enters the reduction
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.main_grad = p.grad
                _allreduce_by_kind(params, _data_parallel_topology(), main_grad=True)

            def broadcast_params(self):
                """--data-parallel-random-init: replicated parameters start from data rank 0's;
                experts keep their own (each is drawn from its own seed, so replicas agree)."""
                from megatron import mpu
                for p in self.module.parameters():
                    if getattr(p, 'dp_comm', 'dp') in ('dp', 'gate'):
                        dist.broadcast(p.data, src=mpu.get_data_parallel_src_rank(),
                                       group=mpu.get_data_parallel_group())

        _LOCAL_DDP.append(ExpertAwareDDP)
    return _LOCAL_DDP[0](module, accumulate_allreduce_grads_in_fp32, use_contiguous_buffers)
{%- endblock %}
