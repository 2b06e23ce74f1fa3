//! FasterMoE's performance model (He et al., "FasterMoE: Modeling and Optimizing Training
//! of Large-Scale Dynamic Pre-Trained Models", PPoPP'22; laekov/fastmoe `fmoe/fastermoe/`):
//! how long one MoE layer's expert exchange takes on the busiest rank of an expert group,
//! how much of it the smart schedule hides behind the expert matmuls, and which experts
//! dynamic shadowing should replicate.
//!
//! Owns the formulas that both the planner (its time estimate, `fmoec plan`) and the runtime
//! (the per-step shadowing decision of `fmoec run`) use, so that the plan and the run decide
//! alike. Plain arithmetic on counts and seconds: it knows nothing about tensors, ranks'
//! handles, the language or how the plan is printed.
//!
//! # The model
//! A rank `q` of an expert group of `G` ranks, for one micro-batch (forward and backward):
//! - moves `max(received_q, sent_q)` token rows over its link four times (dispatch and
//!   combine, and their gradients): `4 · rows · row_transfer_s` (links are full duplex);
//! - computes the rows of the experts it owns that are not shadowed, from every rank, and
//!   its own rows of the shadowed experts: `rows · row_compute_s`;
//! - the group waits for its busiest rank: the exchange takes `max_q (transfer_q +
//!   compute_q)`, plus `shadow_s` per shadowed expert (its parameters broadcast from the
//!   owner, its gradient reduced back).
//!
//! The smart schedule splits the exchange into `n` chunks of peers and pipelines them with
//! the expert matmuls: two resources (link and compute), `n` equal pieces, so
//! `max(T, C) + min(T, C) / n`, plus a fixed [`CALL_LATENCY_S`] for each of the `4 (n − 1)`
//! extra all-to-all calls.
//!
//! Shadowing picks, among the experts sorted by load (busiest first, lower id first on
//! ties), the prefix that makes the exchange fastest (none when nothing pays). FasterMoE's
//! own policy (`shadow_policy.py`) compares the busiest expert's time with the next one's
//! plus the broadcasts; this one measures ranks rather than experts (a rank holding two
//! warm experts is as slow as one holding a hot one) and takes the best prefix rather than
//! stopping at the first that does not pay (two hot experts on two ranks pay only together).

use serde::Serialize;

/// The fixed cost of one collective call: an all-to-all of 1 MiB and of 16 MiB per rank
/// through the collective layer took 119 and 113 µs on two H200s (BENCHMARKS.md,
/// 2026-11-28, `fmoec-collective-check --gpus 2`), so about 100 µs of each call does not
/// depend on its size. Not measured for the side-stream exchange of the smart schedule.
pub const CALL_LATENCY_S: f64 = 100e-6;

/// What rows and experts of one MoE layer cost on one expert group, per micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ExchangeCosts {
    /// Seconds to move one token row between two ranks once (of the four times: dispatch,
    /// combine, and their gradients).
    pub row_transfer_s: f64,
    /// Seconds of one row through its expert, forward and backward.
    pub row_compute_s: f64,
    /// Seconds to replicate one expert: its parameters broadcast from the owner and its
    /// gradient reduced back to it, call latencies included.
    pub shadow_s: f64,
    /// The fixed seconds of one collective call ([`CALL_LATENCY_S`]).
    pub call_s: f64,
}

impl ExchangeCosts {
    /// The costs of a layer whose token rows are `row_bytes` long and take `row_flops` of
    /// expert matmuls forward and backward, whose experts hold `expert_bytes` of
    /// parameters (replicated and reduced as they are stored), over links of `link_bytes_s`
    /// bytes/s on GPUs of `flops_s` FLOP/s.
    pub fn of_layer(
        row_bytes: f64,
        row_flops: f64,
        expert_bytes: f64,
        link_bytes_s: f64,
        flops_s: f64,
    ) -> ExchangeCosts {
        let link = link_bytes_s.max(f64::MIN_POSITIVE);
        ExchangeCosts {
            row_transfer_s: row_bytes / link,
            row_compute_s: row_flops / flops_s.max(f64::MIN_POSITIVE),
            shadow_s: 2.0 * expert_bytes / link + 2.0 * CALL_LATENCY_S,
            call_s: CALL_LATENCY_S,
        }
    }
}

/// One rank's share of an exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankLoad {
    /// Rows it receives from the other ranks (for experts it owns, not shadowed).
    pub received: f64,
    /// Rows it sends to the other ranks (for experts they own, not shadowed).
    pub sent: f64,
    /// Rows it runs through experts: those it owns (not shadowed) from every rank, and its
    /// own rows of the shadowed experts.
    pub computed: f64,
}

impl RankLoad {
    /// Seconds of this rank: its link (`max(received, sent)`, four times) and its experts.
    pub fn seconds(&self, c: &ExchangeCosts) -> f64 {
        4.0 * self.received.max(self.sent) * c.row_transfer_s + self.computed * c.row_compute_s
    }
}

/// Who sends what to whom: `rows[s][e]` token rows of rank `s` (a position in the expert
/// group) go to global expert `e`, which position `owner[e]` holds.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRows<'a> {
    pub rows: &'a [Vec<f64>],
    pub owner: &'a [usize],
}

impl GroupRows<'_> {
    fn ranks(&self) -> usize {
        self.rows.len()
    }

    fn row(&self, s: usize, e: usize) -> f64 {
        self.rows
            .get(s)
            .and_then(|r| r.get(e))
            .copied()
            .unwrap_or(0.0)
    }

    /// Every rank's load when the experts marked in `shadowed` are replicated.
    pub fn loads(&self, shadowed: &[bool]) -> Vec<RankLoad> {
        let ranks = self.ranks();
        let mut loads = vec![RankLoad::default(); ranks];
        for (e, &owner) in self.owner.iter().enumerate() {
            if shadowed.get(e).copied().unwrap_or(false) {
                for (s, load) in loads.iter_mut().enumerate() {
                    load.computed += self.row(s, e);
                }
                continue;
            }
            for s in 0..ranks {
                let rows = self.row(s, e);
                if let Some(load) = loads.get_mut(owner) {
                    load.computed += rows;
                }
                if s != owner {
                    loads[s].sent += rows;
                    if let Some(load) = loads.get_mut(owner) {
                        load.received += rows;
                    }
                }
            }
        }
        loads
    }

    /// The exchange's seconds with `shadowed` replicated: the busiest rank, plus the
    /// replication of each shadowed expert.
    pub fn seconds(&self, shadowed: &[bool], c: &ExchangeCosts) -> f64 {
        let busiest = self
            .loads(shadowed)
            .iter()
            .map(|l| l.seconds(c))
            .fold(0.0, f64::max);
        busiest + shadowed.iter().filter(|&&s| s).count() as f64 * c.shadow_s
    }

    /// The busiest rank's (transfer, compute) seconds with `shadowed` replicated.
    pub fn busiest(&self, shadowed: &[bool], c: &ExchangeCosts) -> (f64, f64) {
        self.loads(shadowed)
            .iter()
            .map(|l| {
                (
                    4.0 * l.received.max(l.sent) * c.row_transfer_s,
                    l.computed * c.row_compute_s,
                )
            })
            .fold((0.0, 0.0), |best, x| {
                if x.0 + x.1 > best.0 + best.1 {
                    x
                } else {
                    best
                }
            })
    }
}

/// The experts to replicate (ascending global ids): the prefix of the experts sorted by
/// load that makes [`GroupRows::seconds`] smallest (the shortest of equally fast prefixes;
/// empty when replicating does not pay). Deterministic: ranks that pass the same counts
/// get the same answer.
pub fn choose_shadows(traffic: &GroupRows, c: &ExchangeCosts) -> Vec<usize> {
    let experts = traffic.owner.len();
    let ranks = traffic.ranks();
    let load = |e: usize| -> f64 { (0..ranks).map(|s| traffic.row(s, e)).sum() };
    let mut candidates: Vec<(f64, usize)> = (0..experts)
        .map(|e| (load(e), e))
        .filter(|(l, _)| *l > 0.0)
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // Add experts one at a time, updating every rank's load in O(ranks).
    let mut loads = traffic.loads(&[]);
    let seconds = |loads: &[RankLoad], shadows: usize| -> f64 {
        loads.iter().map(|l| l.seconds(c)).fold(0.0, f64::max) + shadows as f64 * c.shadow_s
    };
    let mut best = (seconds(&loads, 0), 0usize);
    for (taken, &(_, e)) in candidates.iter().enumerate() {
        let Some(&owner) = traffic.owner.get(e) else {
            continue;
        };
        for s in 0..ranks {
            let rows = traffic.row(s, e);
            if let Some(load) = loads.get_mut(owner) {
                load.computed -= rows;
            }
            loads[s].computed += rows;
            if s != owner {
                loads[s].sent -= rows;
                if let Some(load) = loads.get_mut(owner) {
                    load.received -= rows;
                }
            }
        }
        let t = seconds(&loads, taken + 1);
        if t < best.0 {
            best = (t, taken + 1);
        }
    }
    let mut chosen: Vec<usize> = candidates[..best.1].iter().map(|&(_, e)| e).collect();
    chosen.sort_unstable();
    chosen
}

/// Seconds of an exchange of `transfer_s` link time and `compute_s` expert time pipelined
/// in `chunks` pieces: `max + min / chunks` and the extra calls' latency. One chunk is the
/// plain exchange, `transfer_s + compute_s`.
pub fn pipelined_s(transfer_s: f64, compute_s: f64, chunks: u64, call_s: f64) -> f64 {
    if chunks <= 1 {
        return transfer_s + compute_s;
    }
    let n = chunks as f64;
    transfer_s.max(compute_s) + transfer_s.min(compute_s) / n + 4.0 * (n - 1.0) * call_s
}

/// The chunk count in `1..=max_chunks` with the fastest [`pipelined_s`] (the fewest of
/// equally fast ones).
pub fn best_chunks(transfer_s: f64, compute_s: f64, max_chunks: u64, call_s: f64) -> u64 {
    let mut best = (pipelined_s(transfer_s, compute_s, 1, call_s), 1);
    for n in 2..=max_chunks.max(1) {
        let t = pipelined_s(transfer_s, compute_s, n, call_s);
        if t < best.0 {
            best = (t, n);
        }
    }
    best.1
}

/// The share of a layer's routed rows each of `experts` experts gets when the busiest one
/// takes `skew` times the mean and the others share the rest evenly (the routing of
/// `fmoec bench moe --routing skewed` at `skew = 3`). `skew` is clamped to `1..=experts`.
pub fn skewed_shares(experts: usize, skew: f64) -> Vec<f64> {
    if experts == 0 {
        return Vec::new();
    }
    let e = experts as f64;
    let skew = skew.clamp(1.0, e);
    let hot = skew / e;
    let rest = if experts > 1 {
        (1.0 - hot) / (e - 1.0)
    } else {
        0.0
    };
    (0..experts)
        .map(|i| if i == 0 { hot } else { rest })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> ExchangeCosts {
        ExchangeCosts {
            row_transfer_s: 1.0,
            row_compute_s: 1.0,
            shadow_s: 50.0,
            call_s: 0.0,
        }
    }

    fn run(rows: &[Vec<f64>], owner: &[usize], c: &ExchangeCosts) -> Vec<usize> {
        choose_shadows(&GroupRows { rows, owner }, c)
    }

    #[test]
    fn balanced_routing_shadows_nothing() {
        let rows = vec![vec![10.0; 4]; 2];
        assert!(run(&rows, &[0, 0, 1, 1], &costs()).is_empty());
    }

    #[test]
    fn a_hot_expert_is_shadowed_when_its_tokens_cost_more_than_its_weights() {
        // expert 0 (rank 0) takes 100 rows from each of 4 ranks, the others 5
        let rows: Vec<Vec<f64>> = (0..4)
            .map(|_| vec![100.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
            .collect();
        let owner = [0, 0, 1, 1, 2, 2, 3, 3];
        assert_eq!(run(&rows, &owner, &costs()), vec![0]);
        // weights dearer than the tokens saved: nothing
        let dear = ExchangeCosts {
            shadow_s: 1e6,
            ..costs()
        };
        assert!(run(&rows, &owner, &dear).is_empty());
    }

    #[test]
    fn two_hot_experts_on_two_ranks_are_shadowed_together() {
        // replicating one alone leaves the other rank as slow: only both pay
        let rows: Vec<Vec<f64>> = (0..4).map(|_| vec![100.0, 100.0, 5.0, 5.0]).collect();
        let chosen = run(&rows, &[0, 1, 2, 3], &costs());
        assert_eq!(chosen, vec![0, 1]);
    }

    #[test]
    fn loads_count_rows_once_and_shadows_locally() {
        let rows = vec![vec![3.0, 1.0], vec![2.0, 4.0]];
        let t = GroupRows {
            rows: &rows,
            owner: &[0, 1],
        };
        let plain = t.loads(&[]);
        assert_eq!(plain[0].received, 2.0);
        assert_eq!(plain[0].sent, 1.0);
        assert_eq!(plain[0].computed, 5.0);
        assert_eq!(plain[1].computed, 5.0);
        let shadowed = t.loads(&[true, false]);
        assert_eq!(shadowed[0].received, 0.0);
        assert_eq!(shadowed[0].computed, 3.0);
        assert_eq!(shadowed[1].computed, 2.0 + 5.0);
        assert_eq!(shadowed[1].sent, 0.0);
    }

    #[test]
    fn the_pipeline_hides_the_shorter_resource() {
        assert_eq!(pipelined_s(4.0, 2.0, 1, 0.0), 6.0);
        assert_eq!(pipelined_s(4.0, 2.0, 2, 0.0), 5.0);
        assert_eq!(pipelined_s(4.0, 2.0, 4, 0.0), 4.5);
        // latency makes many chunks dear
        assert_eq!(best_chunks(4.0, 2.0, 4, 0.0), 4);
        assert_eq!(best_chunks(4.0, 2.0, 4, 1.0), 1);
        assert_eq!(best_chunks(4e-3, 4e-3, 8, 1e-4), 3);
    }

    #[test]
    fn skewed_shares_sum_to_one() {
        let s = skewed_shares(8, 3.0);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((s[0] / (1.0 / 8.0) - 3.0).abs() < 1e-12);
        assert_eq!(skewed_shares(4, 1.0), vec![0.25; 4]);
        assert_eq!(skewed_shares(2, 9.0), vec![1.0, 0.0]);
    }
}
