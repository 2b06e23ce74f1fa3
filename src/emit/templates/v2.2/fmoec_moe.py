{% extends "shared/fmoec_moe.py" %}
{%- block patch_calls %}
  add_arguments(parser)                       megatron/arguments.py
  fmoefy(model)                               megatron/training.py, get_model
  DistributedDataParallel                     megatron/training.py (replaces LocalDDP)
  save_checkpoint, load_checkpoint            megatron/training.py
  begin_step(optimizer)                       megatron/training.py, train_step
  training_log_hook(loss_dict, iteration)     megatron/training.py, training_log
  copy_param_tags(main_param, param)          megatron/optimizer/optimizer.py
  agree_found_inf(found_inf)                  megatron/optimizer/optimizer.py, fp16 overflow check
  clip_grad_norm_fp32                         megatron/optimizer/clip_grads.py
{%- endblock %}
{%- block data_parallel -%}
class DistributedDataParallel(nn.Module):
    """Megatron's local DDP, reducing each parameter over its kind's group (see `dp_comm`)."""
    def __init__(self, module, topology=None):
        nn.Module.__init__(self)   # not super(): the FastMoE runtime rebinds this class's name
        self.module = module
        self.topology = topology
        self.needs_reduction = False

    def _topo(self):
        return self.topology if self.topology is not None else _data_parallel_topology()

    def allreduce_params(self, reduce_after=True, no_scale=False, fp32_allreduce=False):
        if not self.needs_reduction:
            return
        self.needs_reduction = False
        _allreduce_by_kind(list(self.module.parameters()), self._topo(), fp32_allreduce)

    def forward(self, *inputs, **kwargs):
        self.needs_reduction = True
        return self.module(*inputs, **kwargs)

    def state_dict(self, destination=None, prefix='', keep_vars=False):
        return self.module.state_dict(destination, prefix, keep_vars)

    def state_dict_for_save_checkpoint(self, destination=None, prefix='', keep_vars=False):
        return self.module.state_dict_for_save_checkpoint(destination, prefix, keep_vars)

    def load_state_dict(self, state_dict, strict=True):
        self.module.load_state_dict(state_dict, strict=strict)
{%- endblock %}
{%- block fastmoe %}
{%- if v.fastmoe %}


# ---------------------------------------------------------------------------------------------
# FastMoE runtime: FastMoE's MoE layers, data parallelism and checkpoints replace the ones
# above; the arguments, the layer selection, the balance loss and the clipping stay fmoec's.
# ---------------------------------------------------------------------------------------------
_FMOEC_DDP = DistributedDataParallel


def fmoefy(model):
    """Replace the MLP of the selected layers by FastMoE's `MegatronMLP`."""
    from megatron import get_args, mpu
    from fmoe.megatron.balance import reset_gate_hook
    from fmoe.megatron.layers import MegatronMLP
    args = get_args()
    if not getattr(args, 'fmoefy', True):
        return model
    if args.DDP_impl != 'local':
        raise ValueError('fmoec: MoE layers need --DDP-impl local (the expert-aware data parallelism)')
    topo = _megatron_topology(args.fmoe_expert_group_size)
    if topo.expert_size not in (1, topo.data_size):
        raise ValueError('fmoec: FastMoE splits experts over the whole data-parallel group or not at all')
    set_topology(topo)
    layers = model.language_model.transformer.layers
    offset = mpu.get_pipeline_model_parallel_rank() * len(layers)
    selected = set(args.fmoe_layers or [])
    # FastMoE's balance bookkeeping reads args.balance_strategy when it is reset
    args.balance_strategy = _layer_spec(min(selected) if selected else 0, args)['gate']
    reset_gate_hook(args.num_layers)
    for local, layer in enumerate(layers):
        index = offset + local
        if index not in selected:
            continue
        spec = _layer_spec(index, args)
        # FastMoE's MegatronMLP reads its settings from these argument names.
        args.fmoe_num_experts = args.fmoe_num_experts or spec['experts'] // topo.expert_size
        args.top_k = spec['top_k']
        args.balance_strategy = spec['gate']
        args.hidden_hidden_size = spec['hidden'] // topo.tensor_size
        args.distributed_experts = topo.expert_size > 1
        mlp = MegatronMLP(args, index)
        _attach_fastmoe_balance(mlp, index, float(spec['balance_loss']), topo)
        layer.mlp = mlp
    return model


def _attach_fastmoe_balance(mlp, index, weight, topo):
    forward = mlp.forward

    def forward_with_balance(inp):
        out, bias = forward(inp)
        gate = mlp.gate
        if mlp.training and getattr(gate, 'has_loss', False):
            loss = gate.get_loss(clear=True).float().reshape(())
            _record(index, loss.detach(), 0.0)
            if weight != 0.0 and loss.requires_grad:
                out = _AttachBalanceLoss.apply(out, loss * weight, 1.0 / topo.tensor_size)
        return out, bias

    mlp.forward = forward_with_balance


class DistributedDataParallel(_FMOEC_DDP):
    """fmoec's wrapper (so Megatron's isinstance checks hold) reducing with FastMoE's."""
    def __init__(self, module, topology=None):
        super(DistributedDataParallel, self).__init__(module, topology)
        from fmoe.megatron.distributed import DistributedDataParallel as FastMoEDDP
        self._fastmoe = [FastMoEDDP(module)]   # a list: not registered as a submodule

    def allreduce_params(self, reduce_after=True, no_scale=False, fp32_allreduce=False):
        if not self.needs_reduction:
            return
        self.needs_reduction = False
        self._fastmoe[0].allreduce_params(no_scale=no_scale, reduce_after=reduce_after,
                                          fp32_allreduce=fp32_allreduce)


def save_checkpoint(iteration, model, optimizer, lr_scheduler):
    from fmoe.megatron.checkpoint import save_checkpoint as fastmoe_save
    return fastmoe_save(iteration, model, optimizer, lr_scheduler)


def load_checkpoint(model, optimizer, lr_scheduler, load_arg='load'):
    from fmoe.megatron.checkpoint import load_checkpoint as fastmoe_load
    return fastmoe_load(model, optimizer, lr_scheduler, load_arg)
{%- endif %}
{%- endblock %}
