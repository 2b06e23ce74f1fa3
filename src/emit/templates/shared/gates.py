# ---------------------------------------------------------------------------------------------
# Gates (FastMoE semantics). Each returns (idx [N, k] global expert or -1, score [N, k], loss).
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
    """Keep the first `capacity[e]` entries (token-major order) for each expert e; drop the rest."""
    flat = idx.reshape(-1).clone()
    valid = (flat >= 0).nonzero().reshape(-1)
    chosen = flat[valid]
    pos = _occurrence(chosen, num_experts)
    flat[valid[pos >= capacity[chosen]]] = -1
    return flat.view_as(idx)


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


class NaiveGate(_BaseGate):
    """Top-k of a linear layer's logits, softmax over the k chosen logits. No loss."""
    NAME = 'naive'

    def __init__(self, d_model, num_experts, top_k, topo, bias=None, **_):
        super(NaiveGate, self).__init__(d_model, num_experts, top_k, topo)
        self.gate = nn.Linear(d_model, num_experts, bias=_FMOEC_BIAS if bias is None else bias)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1, largest=True, sorted=True)
        score = F.softmax(val.float(), dim=-1).to(x.dtype)
        return idx, score, logits.new_zeros((), dtype=torch.float32)


class NoisyGate(_BaseGate):
    """Noisy top-k gating (Shazeer et al. 2017) as FastMoE: loss = cv^2(importance) + cv^2(load)."""
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
        if not self.training:
            val, idx = torch.topk(clean, k=self.top_k, dim=1)
            score = F.softmax(val.float(), dim=1).to(x.dtype)
            return idx, score, clean.new_zeros((), dtype=torch.float32)
        stddev = F.softplus(x @ self.w_noise) + self.noise_epsilon
        noisy = clean + torch.randn_like(clean) * stddev
        m = min(self.top_k + 1, self.num_experts)
        top_val, top_idx = noisy.topk(m, dim=1)
        k_val, k_idx = top_val[:, :self.top_k], top_idx[:, :self.top_k]
        k_score = F.softmax(k_val.float(), dim=1)
        gates = torch.zeros_like(clean, dtype=torch.float32).scatter(1, k_idx, k_score)
        if self.top_k < self.num_experts:
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
    """GShard: top-2, loss mean(c_e * m_e) * E^2, capacity ceil(c * N) * k // E per expert from
    this rank's tokens, then random routing drops the second expert when 2 * p2 < U(0, 1).
    E is the total expert count (FastMoE used the per-worker count, which made the loss depend
    on the number of expert ranks)."""
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
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * n)) * 2 // self.num_experts
        capacity = torch.full((self.num_experts,), cap, dtype=torch.long, device=x.device)
        idx = _prune_local(idx, capacity, self.num_experts)
        if self.random_routing and self.training:
            u = torch.rand(n, device=x.device)
            drop = 2 * score[:, 1] < u
            idx[:, 1] = torch.where(drop, torch.full_like(idx[:, 1], -1), idx[:, 1])
        return idx, score.to(x.dtype), loss


class SwitchGate(NaiveGate):
    """Switch: in training the gate's input is multiplied by U(1 - eps, 1 + eps) (the Switch
    Transformer's jitter, as `fmoec run`; FastMoE adds that noise to the logits instead, a
    deliberate difference listed in fmoec's README), softmax, top-1; capacity
    ceil(c * N / experts per rank) per expert over the whole expert group, granted to ranks in
    rank order; loss = sum(f_e * p_e) * E over the kept tokens."""
    NAME = 'switch'

    def __init__(self, d_model, num_experts, top_k, topo, capacity=None, jitter=None, bias=None, **_):
        super(SwitchGate, self).__init__(d_model, num_experts, top_k, topo, bias=bias)
        self.capacity = tuple(self._default('capacity', capacity))
        self.jitter = self._default('jitter', jitter)

    def _jitter_draws(self, x):
        """U(0, 1) draws of x's shape (a test replaces them with given ones)."""
        return torch.rand_like(x)

    def forward(self, x):
        if self.training and self.jitter > 0:
            x = x * (self._jitter_draws(x) * 2 * self.jitter + 1.0 - self.jitter)
        logits = self.gate(x)
        prob = F.softmax(logits.float(), dim=-1)
        score, idx = torch.topk(prob, k=1, dim=-1)
        topo = self.topo
        local = self.num_experts // topo.expert_size
        rate = self.capacity[0 if self.training else 1]
        cap = int(math.ceil(rate * x.shape[0] / local))
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
            allowed = _grant_capacity(counts, cap, local, topo)
        idx = _prune_local(idx, allowed, self.num_experts)
        kept = idx[idx > -1]
        frac = torch.zeros(self.num_experts, device=x.device).scatter_add(
            0, kept, torch.ones_like(kept, dtype=torch.float32)) / max(kept.numel(), 1)
        p = prob.sum(0) / max(kept.numel(), 1)
        loss = (frac * p).sum() * self.num_experts
        return idx, score.to(x.dtype), loss


def _grant_capacity(counts, cap, local, topo):
    """Global capacity `cap` per expert, granted to the ranks of the expert group in rank order.
    counts: this rank's tokens per global expert. Returns this rank's allowance per global expert."""
    w = topo.expert_size
    if w == 1:
        return counts.clamp(max=cap)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=topo.expert_group)
    recv = recv.view(w, local)                     # [source rank, my local expert]
    before = torch.cumsum(recv, 0) - recv
    grant = (cap - before).clamp(min=0)
    grant = torch.min(grant, recv).reshape(-1).contiguous()
    back = torch.empty_like(grant)
    dist.all_to_all_single(back, grant, group=topo.expert_group)
    return back


class SwipeGate(NaiveGate):
    """SWIPE (FastMoE): per top-k slot, each rank of the expert group accepts at most its
    remaining capacity (initially N * k) of tokens, in source-rank order; rejected tokens are
    re-assigned, in order, to ranks with capacity left (their expert `slot % experts per rank`)."""
    NAME = 'swipe'

    def __init__(self, d_model, num_experts, top_k, topo, bias=None, **_):
        super(SwipeGate, self).__init__(d_model, num_experts, top_k, topo, bias=bias)

    def forward(self, x):
        logits = self.gate(x)
        val, idx = torch.topk(logits, k=self.top_k, dim=-1)
        if not self.training:
            return idx, F.softmax(val.float(), dim=-1).to(x.dtype), logits.new_zeros((), dtype=torch.float32)
        topo = self.topo
        local = self.num_experts // topo.expert_size
        cap = x.shape[0] * self.top_k
        rows = torch.arange(x.shape[0], device=x.device)
        idxs, vals = [], []
        for k in range(self.top_k):
            new_idx, cap = _swipe_once(idx[:, k], cap, local, k % local, topo)
            idxs.append(new_idx)
            vals.append(logits[rows, new_idx])
        idx = torch.stack(idxs, 1)
        score = F.softmax(torch.stack(vals, 1).float(), dim=-1).to(x.dtype)
        return idx, score, logits.new_zeros((), dtype=torch.float32)


def _swipe_once(idx, cap, local, bias, topo):
    w, me = topo.expert_size, topo.expert_rank
    dev = idx.device    # collectives run on the tensors' device (NCCL needs CUDA tensors)
    with torch.no_grad():
        worker = (idx // local).cpu()
        lec = torch.bincount(worker, minlength=w).long()
        if w > 1:
            gec = torch.empty_like(lec).to(dev)
            dist.all_to_all_single(gec, lec.to(dev), group=topo.expert_group)
            gec = gec.cpu()
        else:
            gec = lec.clone()
        drop = torch.zeros(w, dtype=torch.long)
        gec = gec.tolist()
        for i in range(w):
            if cap >= gec[i]:
                cap -= gec[i]
            else:
                drop[i] = gec[i] - cap
                gec[i] = cap
                cap = 0
        gec_t = torch.tensor(gec, dtype=torch.long)
        if w > 1:
            lec = torch.empty_like(gec_t).to(dev)
            dist.all_to_all_single(lec, gec_t.to(dev), group=topo.expert_group)
            lec = lec.cpu()
            drop = drop.to(dev)
            dist.all_reduce(drop, group=topo.expert_group)
            drop = drop.cpu()
            caps = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(w)]
            dist.all_gather(caps, torch.tensor([cap], dtype=torch.long, device=dev), group=topo.expert_group)
            gcap = [int(c.item()) for c in caps]
        else:
            lec = gec_t.clone()
            gcap = [cap]
        lec = lec.tolist()
        drop = drop.tolist()
        j = 0
        for i in range(w):
            while drop[i] > 0:
                count = min(drop[i], gcap[j])
                drop[i] -= count
                gcap[j] -= count
                if i == me:
                    lec[j] += count
                if j == me:
                    cap -= count
                if drop[i] > 0:
                    j += 1
        out = idx.clone().cpu()
        pos = _occurrence(worker, w)
        limit = torch.tensor(lec, dtype=torch.long)
        keep = pos < limit[worker]
        taken = torch.bincount(worker[keep], minlength=w)
        left = (limit - taken).clamp(min=0)
        dropped = (~keep).nonzero().reshape(-1)
        target = torch.repeat_interleave(torch.arange(w), left)[:dropped.numel()]
        out[dropped] = target * local + bias
    return out.to(idx.device), cap


_GATE_CLASSES = {name: globals()[d['cls']] for name, d in _GATES.items()}
