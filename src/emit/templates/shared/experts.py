class _OnlyOnRankZero(torch.autograd.Function):
    """`x` on (expert-)tensor rank 0 and zeros elsewhere, the gradient reaching every rank: the
    experts' output bias is added once to the summed output and stays identical on every rank."""

    @staticmethod
    def forward(ctx, x, keep):
        return x.clone() if keep else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _experts_forward(x, counts, act, w1, b1, w3, w2, b2, params):
    """The local experts over their rows of `x` (`counts[e]` rows for expert `e`, in order):
    `w2(act(x w1^T + b1)) + b2`, SwiGLU `w2(silu(x w1^T + b1) * x w3^T) + b2`, as `fmoec run`
    computes them; every tensor of `params` is touched, so each has a gradient even when no
    token reached its expert."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        rows = x[start:start + c]
        start += c
        h = F.linear(rows, w1[e], None if b1 is None else b1[e])
        if act == 'gelu':
            h = F.gelu(h)
        elif act == 'relu':
            h = F.relu(h)
        else:
            h = F.silu(h) * F.linear(rows, w3[e])
        outs.append(F.linear(h, w2[e], None if b2 is None else b2[e]))
    if not outs:
        return x.new_zeros((0, w2.shape[1]))
    out = torch.cat(outs, 0)
    extra = sum(p.sum() for p in params) * 0.0
    return out + extra.to(out.dtype)
