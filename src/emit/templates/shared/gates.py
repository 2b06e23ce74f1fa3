# ---------------------------------------------------------------------------------------------
# Gates (FastMoE's, with fmoec's deliberate differences: README, "Where fmoec differs from FastMoE
# on purpose"; `fmoec run` routes alike). Each routes this rank's tokens on their own, as one
# rank would, and returns (idx [N, k] global expert or -1, score [N, k], loss). `topo` is kept
# for the interface: no gate communicates.
# ---------------------------------------------------------------------------------------------
def _occurrence(idx_flat, num_experts):
    """For each entry of idx_flat (>= 0), how many earlier entries chose the same expert."""
    n = idx_flat.numel()
    key = idx_flat.clamp(min=0) * n + torch.arange(n, device=idx_flat.device)
    order = torch.sort(key).indices
    sorted_e = idx_flat.clamp(min=0)[order]
    counts = torch.bincount(sorted_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(n, device=idx_flat.device) - starts[sorted_e]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return pos


def _prune_local(idx, capacity, num_experts):
    """Keep the first `capacity[e]` slots of each expert e and drop the rest, in slot-major order:
    every token's first choice before any token's second choice (GShard's order)."""
    flat = idx.t().reshape(-1).clone()
    valid = (flat >= 0).nonzero().reshape(-1)
    chosen = flat[valid]
    pos = _occurrence(chosen, num_experts)
    flat[valid[pos >= capacity[chosen]]] = -1
    return flat.view(idx.shape[1], idx.shape[0]).t()


def _slot_balance_loss(logits, idx, num_experts):
    """E * sum_e f_e * P_e over all experts: f_e the fraction of the N * k slots routed to e,
    P_e the mean probability of e (DeepSeek-MoE's expert-level balance loss)."""
    slots = idx.reshape(-1)
    f = torch.zeros(num_experts, device=logits.device).scatter_add(
        0, slots, torch.ones_like(slots, dtype=torch.float32)) / slots.numel()
    p = F.softmax(logits.float(), dim=-1).mean(0)
    return (f * p).sum() * num_experts


class _BaseGate(nn.Module):
    NAME = None

    def __init__(self, d_model, num_experts, top_k, topo):
        super(_BaseGate, self).__init__()
        self.d_model, self.num_experts, self.top_k, self.topo = d_model, num_experts, top_k, topo
        routes = _GATES[self.NAME]['top_k']
        if routes is not None and top_k != routes:
            raise ValueError('fmoec: the {} gate routes to {} expert(s), not {}'.format(self.NAME, routes, top_k))

    def _default(self, key, value):
        """An argument not given takes the gate's default from the table above."""
        return _GATES[self.NAME][key] if value is None else value

    def _uniform(self, shape, like):
        """U(0, 1) draws of `shape` in `like`'s dtype and device (a test gives every engine the
        same draws through this method and `_normal`)."""
        return torch.rand(shape, dtype=like.dtype, device=like.device)

    def _normal(self, shape, like):
        """Standard normal draws of `shape` in `like`'s dtype and device."""
        return torch.randn(shape, dtype=like.dtype, device=like.device)


class NaiveGate(_BaseGate):
    """Top-k of a linear layer's logits, softmax over the k chosen logits; loss E * sum_e f_e * P_e
    (FastMoE's naive gate has no loss)."""
    NAME = 'naive'

    def __init__(self, d_model, num_experts, top_k, topo, bias=None, **_):
        super(NaiveGate, self).__init__(d_model, num_experts, top_k, topo)
        self.gate = nn.Linear(d_model, num_experts, bias=_FMOEC_BIAS if bias is None else bias)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1, largest=True, sorted=True)
        score = F.softmax(val.float(), dim=-1).to(x.dtype)
        return idx, score, _slot_balance_loss(logits, idx, self.num_experts)


class NoisyGate(_BaseGate):
    """Noisy top-k gating (Shazeer et al. 2017) as FastMoE: loss = cv^2(importance) + cv^2(load),
    the load from the noise's distribution in training and the routed tokens in evaluation."""
    NAME = 'noisy'

    def __init__(self, d_model, num_experts, top_k, topo, **_):
        super(NoisyGate, self).__init__(d_model, num_experts, top_k, topo)
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))
        self.noise_epsilon = 1e-2

    @staticmethod
    def _cv_squared(x):
        if x.shape[0] == 1:
            return x.new_zeros(()).float()
        x = x.float()
        return x.var() / (x.mean() ** 2 + 1e-10)

    def forward(self, x):
        clean = x @ self.w_gate
        if self.training:
            stddev = F.softplus(x @ self.w_noise) + self.noise_epsilon
            noisy = clean + self._normal(clean.shape, clean) * stddev
        else:
            stddev, noisy = None, clean
        m = min(self.top_k + 1, self.num_experts)
        top_val, top_idx = noisy.topk(m, dim=1)
        k_val, k_idx = top_val[:, :self.top_k], top_idx[:, :self.top_k]
        k_score = F.softmax(k_val.float(), dim=1)
        gates = torch.zeros_like(clean, dtype=torch.float32).scatter(1, k_idx, k_score)
        if stddev is not None and self.top_k < self.num_experts:
            normal = torch.distributions.normal.Normal(0.0, 1.0)
            thr_in = top_val[:, self.top_k:self.top_k + 1]
            thr_out = top_val[:, self.top_k - 1:self.top_k]
            is_in = noisy > thr_in
            prob = torch.where(is_in, normal.cdf(((clean - thr_in) / stddev).float()),
                               normal.cdf(((clean - thr_out) / stddev).float()))
            load = prob.sum(0)
        else:
            load = (gates > 0).sum(0).float()
        loss = self._cv_squared(gates.sum(0)) + self._cv_squared(load)
        return k_idx, k_score.to(x.dtype), loss


class GShardGate(NaiveGate):
    """GShard: top-2, loss mean(c_e * m_e) * E^2 with E the layer's experts; in training the
    second expert is dropped when 2 * p2 < U(0, 1), then each expert keeps at most
    ceil(c * 2 * N / E) of this rank's slots in slot-major order (FastMoE: random routing after
    `ceil(c * N) * 2 // E` in arrival order, and E the experts of one rank in the loss)."""
    NAME = 'gshard'

    def __init__(self, d_model, num_experts, top_k, topo, capacity=None, random_routing=None, bias=None, **_):
        super(GShardGate, self).__init__(d_model, num_experts, top_k, topo, bias=bias)
        self.capacity = tuple(self._default('capacity', capacity))
        self.random_routing = self._default('random_routing', random_routing)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=2, dim=-1, largest=True, sorted=True)
        score = F.softmax(val.float(), dim=-1)
        n = logits.shape[0]
        top1 = idx[:, 0]
        c_e = torch.zeros(self.num_experts, device=x.device).scatter_add(
            0, top1, torch.ones_like(top1, dtype=torch.float32)) / n
        m_e = F.softmax(logits.float(), dim=1).mean(0)
        loss = (c_e * m_e).mean() * (self.num_experts ** 2)
        if self.random_routing and self.training:
            u = self._uniform((n,), score)
            drop = 2 * score[:, 1] < u
            idx = torch.stack([idx[:, 0], torch.where(drop, torch.full_like(idx[:, 1], -1), idx[:, 1])], 1)
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * (2 * n) / self.num_experts))
        capacity = torch.full((self.num_experts,), cap, dtype=torch.long, device=x.device)
        idx = _prune_local(idx, capacity, self.num_experts)
        return idx, score.to(x.dtype), loss


class SwitchGate(NaiveGate):
    """Switch: in training the gate's input is multiplied by U(1 - eps, 1 + eps) (the Switch
    Transformer's jitter; FastMoE adds that noise to the logits instead), softmax, top-1; each
    expert keeps at most ceil(c * N / E) of this rank's tokens, in token order (FastMoE grants
    its capacity across the ranks of the expert group); loss = sum(f_e * p_e) * E over the kept
    tokens."""
    NAME = 'switch'

    def __init__(self, d_model, num_experts, top_k, topo, capacity=None, jitter=None, bias=None, **_):
        super(SwitchGate, self).__init__(d_model, num_experts, top_k, topo, bias=bias)
        self.capacity = tuple(self._default('capacity', capacity))
        self.jitter = self._default('jitter', jitter)

    def forward(self, x):
        if self.training and self.jitter > 0:
            x = x * (self._uniform(x.shape, x) * (2.0 * self.jitter) + (1.0 - self.jitter))
        logits = self.gate(x)
        prob = F.softmax(logits.float(), dim=-1)
        score, idx = torch.topk(prob, k=1, dim=-1)
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * x.shape[0] / self.num_experts))
        capacity = torch.full((self.num_experts,), cap, dtype=torch.long, device=x.device)
        idx = _prune_local(idx, capacity, self.num_experts)
        kept = idx[idx > -1]
        frac = torch.zeros(self.num_experts, device=x.device).scatter_add(
            0, kept, torch.ones_like(kept, dtype=torch.float32)) / max(kept.numel(), 1)
        p = prob.sum(0) / max(kept.numel(), 1)
        loss = (frac * p).sum() * self.num_experts
        return idx, score.to(x.dtype), loss


class SwipeGate(NaiveGate):
    """SWIPE (FastMoE's algorithm with every expert a worker, over this rank's tokens): per top-k
    slot, each expert accepts at most its remaining capacity (initially ceil(N * k / E)) of the
    tokens, in token order; the tokens it rejects go, in token order, to the experts with
    capacity left, lowest index first. No loss. (FastMoE's workers are the ranks of the expert
    group, each with all its experts.)"""
    NAME = 'swipe'

    def __init__(self, d_model, num_experts, top_k, topo, bias=None, **_):
        super(SwipeGate, self).__init__(d_model, num_experts, top_k, topo, bias=bias)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1)
        if not self.training:
            return idx, F.softmax(val.float(), dim=-1).to(x.dtype), logits.new_zeros((), dtype=torch.float32)
        share = -(-(x.shape[0] * self.top_k) // self.num_experts)
        caps = [share] * self.num_experts
        rows = torch.arange(x.shape[0], device=x.device)
        idxs, vals = [], []
        for k in range(self.top_k):
            new_idx, caps = _swipe_once(idx[:, k], caps)
            idxs.append(new_idx)
            vals.append(logits[rows, new_idx])
        idx = torch.stack(idxs, 1)
        score = F.softmax(torch.stack(vals, 1).float(), dim=-1).to(x.dtype)
        return idx, score, logits.new_zeros((), dtype=torch.float32)


def _swipe_once(idx, caps):
    """One slot of SWIPE. idx: each token's expert; caps: each expert's remaining capacity.
    Returns the new experts and capacities."""
    num = len(caps)
    with torch.no_grad():
        mine = idx.cpu()
        wanted = torch.bincount(mine, minlength=num).tolist()
        limit = [min(w, c) for w, c in zip(wanted, caps)]
        caps = [c - l for c, l in zip(caps, limit)]
        rejected = sum(wanted) - sum(limit)
        for e in range(num):
            take = min(rejected, caps[e])
            limit[e] += take
            caps[e] -= take
            rejected -= take
        if rejected:
            raise RuntimeError('fmoec: SWIPE found no expert with capacity left')
        limit = torch.tensor(limit, dtype=torch.long)
        keep = _occurrence(mine, num) < limit[mine]
        left = (limit - torch.bincount(mine[keep], minlength=num)).clamp(min=0)
        dropped = (~keep).nonzero().reshape(-1)
        out = mine.clone()
        out[dropped] = torch.repeat_interleave(torch.arange(num), left)[:dropped.numel()]
    return out.to(idx.device), caps


_GATE_CLASSES = {name: globals()[d['cls']] for name, d in _GATES.items()}
