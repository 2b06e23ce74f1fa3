"""Running Megatron-Core (core_v0.19.0, PyPI megatron-core 0.19.x) on CPU ranks with gloo.

Owns: the smallest set of stand-ins that lets Megatron-Core's own GPT model, DDP, optimizers,
pipeline schedules and dist_checkpointing run on a CPU-only torch 2.x: the CUDA device, stream,
event and RNG calls Megatron makes, and the two things gloo cannot do that Megatron asks of it.
Must not know about fmoec, about any model, or change what Megatron computes: every stand-in
either does nothing (streams, events, synchronisation) or does on the CPU what Megatron asks of
the GPU. Test-only: never part of an emitted training.

Call `install()` after `torch.distributed.init_process_group('gloo')` and before building models.
"""
import functools
import logging
import typing

import torch
import torch.distributed as dist

if not hasattr(typing, 'override'):
    # megatron.training's model builders import typing.override (Python 3.12); on Python 3.11
    # (the fmoec venv) a decorator that returns the method stands in: it has no other effect
    typing.override = lambda method: method

_INSTALLED = False


class _Stream:
    """A CUDA stream where there is none: work is synchronous on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda(device):
    if isinstance(device, torch.device):
        return device.type == 'cuda'
    return isinstance(device, str) and device.startswith('cuda')


class _CudaOnCpu(torch.overrides.TorchFunctionMode):
    target = 'cpu'

    """Maps device='cuda' (and Tensor.cuda, Tensor.to('cuda'), pinned host memory) to the CPU,
    and names CPU tensor types as their CUDA twins where Megatron asserts them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clipping asserts its gradients are 'torch.cuda.FloatTensor'
            name = func(*args)
            return name.replace('torch.', 'torch.cuda.', 1)
        if _is_cuda(kwargs.get('device')):
            kwargs['device'] = self.target
        if kwargs.get('pin_memory'):
            kwargs['pin_memory'] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], self.target) + tuple(args[2:])
        return func(*args, **kwargs)


class _CpuRngFilter(logging.Filter):
    """On CPU the "GPU" generator *is* the CPU generator, so Megatron's RNG tracker sees the CPU
    state change inside each fork and warns about it every time; the warning says nothing here."""

    def filter(self, record):
        return 'CPU RNG state changed within GPU RNG context' not in record.getMessage()


def install(device='cpu'):
    """Install the CPU stand-ins (idempotent; does nothing when CUDA is available).
    device='meta' makes every tensor Megatron puts on "the GPU" a meta tensor (shapes only),
    to build models far larger than this machine's memory."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    _INSTALLED = True
    _CudaOnCpu.target = device
    cuda = torch.cuda
    # Megatron allocates with device=torch.cuda.current_device(): a CPU device keeps every
    # tensor on the host. Memory figures read as zero.
    cuda.current_device = lambda: device
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    for name in ('memory_allocated', 'max_memory_allocated', 'memory_reserved',
                 'max_memory_reserved'):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: _Stream()
    cuda.set_stream = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False

    # The "GPU" generator is the CPU default generator: Megatron's RNG tracker forks it (per
    # tensor rank, per expert rank) exactly as it forks the CUDA generator on a GPU, so weights
    # and dropout masks differ between ranks the way they do there.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    import megatron.core.tensor_parallel.random as mrandom
    mrandom._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    mrandom._get_cuda_rng_state = (
        lambda device='cuda', clone=False, graph_safe=False: torch.get_rng_state())
    logging.getLogger(mrandom.__name__).addFilter(_CpuRngFilter())

    _patch_gloo_collectives()
    _allow_sequence_parallel_torch_norm()
    # Megatron also writes device='cuda' and .cuda() literally (optimizer flags, clipping, the
    # schedules' token counts, checkpoint exchange): every torch call of this thread from now on
    # sees the CPU instead. A torch function mode, so torch's own functions stay untouched.
    _CudaOnCpu().__enter__()


def _allow_sequence_parallel_torch_norm():
    """Megatron-Core requires sequence parallelism for MoE with tensor parallelism, and its
    plain-torch norm (the one used without Apex or Transformer Engine) refuses sequence
    parallelism. Build the torch norm anyway and tag its parameters `sequence_parallel`, exactly
    as Apex's FusedLayerNorm does on a GPU, so that finalize_model_grads sums their gradients
    over the tensor group."""
    import copy

    from megatron.core.transformer import torch_norm

    build = torch_norm.WrappedTorchNorm.__new__

    def build_sequence_parallel(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not getattr(config, 'sequence_parallel', False):
            return build(cls, config, hidden_size, eps, *args, **kwargs)
        plain = copy.copy(config)
        object.__setattr__(plain, 'sequence_parallel', False)
        norm = build(cls, plain, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(build_sequence_parallel)


def _patch_gloo_collectives():
    """What gloo lacks and Megatron-Core asks for, done with what gloo has."""
    all_to_all_single = dist.all_to_all_single

    @functools.wraps(all_to_all_single)
    def all_to_all_single_lists(output, input, output_split_sizes=None, input_split_sizes=None,
                                *args, **kwargs):
        # On a GPU Megatron hands the split sizes over as host lists (or numpy); on CPU its
        # dispatcher leaves them as tensors, which gloo's binding does not take.
        def as_list(sizes):
            if sizes is None:
                return None
            values = sizes.tolist() if hasattr(sizes, 'tolist') else sizes
            return [int(v) for v in values]

        return all_to_all_single(output, input, as_list(output_split_sizes),
                                 as_list(input_split_sizes), *args, **kwargs)

    dist.all_to_all_single = all_to_all_single_lists

    all_gather = dist.all_gather

    class _Done:
        def wait(self, *args, **kwargs):
            return True

        def is_completed(self):
            return True

    @functools.wraps(all_gather)
    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        # gloo cannot all_gather tensors of different first dimensions (Megatron's gather-v of
        # token counts does): pad to the longest, gather, cut each back.
        if all(t.shape == tensor.shape for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in list(tensor_list) + [tensor])
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        buffers = [tensor.new_empty((longest,) + tuple(tensor.shape[1:])) for _ in tensor_list]
        all_gather(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[:out.shape[0]])
        return _Done() if async_op else None

    dist.all_gather = all_gather_uneven


def pretend_cuda_for_training():
    """megatron.training (initialize_megatron) asserts torch.cuda.is_available() and asks for
    device counts, devices and memory: answer as one device per process. Only for running the
    tree's training loop; the stand-ins above keep every tensor on the CPU."""
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 'cpu'
    cuda.get_device_name = lambda *a, **k: 'cpu'
    cuda.get_device_capability = lambda *a, **k: (9, 0)
    # validation asks the architecture (below 10 it wants CUDA_DEVICE_MAX_CONNECTIONS=1 with
    # tensor parallelism): an H100's
    import os
    import types
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=9, minor=0, name='cpu', total_memory=0, multi_processor_count=1)
    os.environ.setdefault('CUDA_DEVICE_MAX_CONNECTIONS', '1')
    cuda.memory_stats = lambda *a, **k: {}
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.mem_get_info = lambda *a, **k: (0, 0)
    # torch's own DataLoader asks the accelerator for its device (to pin memory): there is none
    torch.accelerator.is_available = lambda: False
    torch.accelerator.current_device_index = lambda: 0


def resumable_distributed_optimizer():
    """Megatron-Core 0.19's distributed optimizer on the torch-AdamW path (no Apex, no Transformer
    Engine: every CPU) cannot resume from its own checkpoints; on a GPU with either, FusedAdam
    keeps the step in the param groups and none of this happens. Three defects, each met by a
    failing resume and each mended here (test-only; Megatron's computation is unchanged):
    - a fresh optimizer cannot describe its state for the load template (`state_dict()` asserts
      one `step` over an empty state): give it the dummy state Megatron itself creates for that
      purpose (`_init_optimizer_states_with_dummy_values`) first;
    - `load_parameter_state_from_dp_reshardable` (inside `load_state_dict`) copies into the main
      parameters in place without the `@torch.no_grad()` its `fs_model_space` sibling has; with
      fp32 parameters those are views of the model's and autograd refuses: load under no_grad;
    - the load restores the step into the param groups, then copies each parameter's `step` from
      the template (the dummy 1) over it, so Adam's bias correction restarts: restore each
      parameter's step from its group."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    if getattr(DistributedOptimizer, '_fmoec_resumable', False):
        return
    DistributedOptimizer._fmoec_resumable = True
    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    load_state_dict = DistributedOptimizer.load_state_dict

    @functools.wraps(sharded_state_dict)
    def sharded_state_dict_for_loading(self, model_sharded_state_dict, is_loading=False,
                                       *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    @functools.wraps(load_state_dict)
    def load_state_dict_keeping_steps(self, state_dict):
        with torch.no_grad():
            load_state_dict(self, state_dict)
        for group in self.optimizer.param_groups:
            for param in group['params']:
                state = self.optimizer.state.get(param)
                if state and 'step' in state and 'step' in group:
                    state['step'] = torch.tensor(float(group['step']), dtype=torch.float32)

    DistributedOptimizer.sharded_state_dict = sharded_state_dict_for_loading
    DistributedOptimizer.load_state_dict = load_state_dict_keeping_steps
