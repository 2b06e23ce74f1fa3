def _wire_dtype(x):
    # gloo has no half-precision collectives: exchange in fp32 there.
    if x.dtype in (torch.float16, torch.bfloat16) and dist.get_backend() == 'gloo':
        return torch.float32
    return x.dtype


def _all_to_all(x, send_splits, recv_splits, group):
    inp = x.to(_wire_dtype(x)).contiguous()
    out = inp.new_empty((int(sum(recv_splits)),) + tuple(inp.shape[1:]))
    dist.all_to_all_single(out, inp, output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out.to(x.dtype)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None
