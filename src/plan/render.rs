//! Printing a [`ParallelPlan`]: the readable table, the JSON document (schema in
//! README.md ("`fmoec plan`")) and the DOT graph. Byte-stable: everything is printed in a fixed
//! order from `Vec`s, never from hash maps.
//!
//! Knows only the plan's public fields; computes nothing but formatting.

use std::fmt::Write;

use super::{FasterMoePlan, ParallelPlan};
use crate::check::{Precision, Shadowing, SmartSchedule};
use crate::graph::ModelGraph;

/// Bytes in binary units, 2 decimals: `1.50 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// An integer with thousands separators: `124,439,808`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `bf16 mixed precision`, ...
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16 mixed precision",
        Precision::Fp16 => "fp16 mixed precision",
        Precision::Fp8 { dense: false } => "bf16 mixed precision, experts in fp8",
        Precision::Fp8 { dense: true } => "bf16 mixed precision, matmuls in fp8",
    }
}

fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{:.3} ms", s * 1e3)
    }
}

fn ranks_list(g: &[u64]) -> String {
    let parts: Vec<String> = g.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// `0-3` or `5` or `0,2,4`.
fn ids(v: &[u64]) -> String {
    match v {
        [] => "-".into(),
        [one] => one.to_string(),
        _ if v.windows(2).all(|w| w[1] == w[0] + 1) => {
            format!("{}-{}", v[0], v[v.len() - 1])
        }
        _ => v.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
    }
}

/// Layer indices compactly: `0-23`, `1-23 step 2`, or a list.
fn layer_list(v: &[usize]) -> String {
    if v.len() > 2 {
        let step = v[1] - v[0];
        if step > 0 && v.windows(2).all(|w| w[1] - w[0] == step) {
            let last = v[v.len() - 1];
            return if step == 1 {
                format!("{}-{last}", v[0])
            } else {
                format!("{}-{last} step {step}", v[0])
            };
        }
    }
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// At most `max` groups, then how many more.
fn group_line(gs: &[Vec<u64>], max: usize) -> String {
    let mut parts: Vec<String> = gs.iter().take(max).map(|g| ranks_list(g)).collect();
    if gs.len() > max {
        parts.push(format!("... ({} groups)", gs.len()));
    }
    parts.join(" ")
}

/// The readable table: one section after another.
pub fn table(plan: &ParallelPlan) -> String {
    let mut o = String::new();
    header(&mut o, plan);
    memory(&mut o, plan);
    params_by_kind(&mut o, plan);
    moe_layers(&mut o, plan);
    ranks(&mut o, plan);
    groups(&mut o, plan);
    traffic(&mut o, plan);
    time(&mut o, plan);
    if let Some(f) = &plan.fastermoe {
        fastermoe_table(&mut o, f);
    }
    o
}

/// The summary lines: hardware, grid, schedule, experts, batch, parameters, assumptions.
fn header(o: &mut String, plan: &ParallelPlan) {
    let hw = &plan.hardware;
    let _ = writeln!(
        o,
        "plan for `{}` on {} × {} ({} each, {} per node)",
        plan.model,
        plan.world,
        hw.name,
        bytes(hw.memory_bytes),
        crate::diag::count(hw.gpus_per_node, "GPU", "GPUs")
    );
    grid_lines(o, plan);
    let _ = writeln!(o, "experts:   {}", experts_summary(plan));
    let _ = writeln!(
        o,
        "batch:     {}, {} tokens/sequence, micro-batch {} × {} × {} = {} sequences/step",
        precision_name(plan.precision),
        plan.seq_len,
        plan.micro_batch,
        crate::diag::count(plan.micro_batches, "micro-batch", "micro-batches"),
        crate::diag::count(plan.data, "data rank", "data ranks"),
        plan.global_batch
    );
    if let Some(f) = &plan.fp8_fallbacks {
        let _ = match f.describe() {
            Some(bf16) => writeln!(
                o,
                "fp8:       bf16 operands for {bf16}, where FP8 would not pay at {} tokens a \
                 micro-batch (the quantisation passes cost more than the faster matmuls save)",
                count(plan.micro_batch * plan.seq_len)
            ),
            None => writeln!(o, "fp8:       every matmul asked for on FP8 operands"),
        };
    }
    let p = &plan.params;
    let _ = writeln!(
        o,
        "params:    {} total ({} in routed experts, {} in gates), {} active per token",
        count(p.total),
        count(p.expert),
        count(p.gate),
        count(p.active)
    );
    for a in &plan.assumptions {
        let _ = writeln!(o, "assumed:   {a}");
    }
}

/// The grid and whose layout it follows; the schedule where it interleaves model chunks.
fn grid_lines(o: &mut String, plan: &ParallelPlan) {
    let layout = match plan.megatron_core {
        Some(_) => "Megatron-Core layout",
        None => "Megatron-LM v2.2 layout",
    };
    let _ = writeln!(
        o,
        "grid:      world {} = tensor {} × pipeline {} × data {} ({layout})",
        plan.world, plan.tensor, plan.pipeline, plan.data
    );
    if plan.virtual_stages > 1 {
        let _ = writeln!(
            o,
            "schedule:  interleaved 1F1B, {} model chunks per stage",
            plan.virtual_stages
        );
    }
}

/// The expert group and how it splits (Megatron-Core's expert grid, or FastMoE's slicing over
/// tensor ranks); `none` for a dense model.
fn experts_summary(plan: &ParallelPlan) -> String {
    let group = || {
        format!(
            "expert group {} ({})",
            plan.expert_group,
            crate::diag::count(plan.expert_group_size, "rank", "ranks")
        )
    };
    match &plan.megatron_core {
        _ if plan.moe_layers.is_empty() => "none (a dense model)".into(),
        Some(core) => format!(
            "{}: expert-parallel {} × expert-tensor {} × expert-data {}{}",
            group(),
            core.expert_parallel,
            core.expert_tensor,
            core.expert_data,
            if core.whole_experts_for_bias {
                " (experts with biases whole, not sliced)"
            } else {
                ""
            }
        ),
        None => format!(
            "{}, expert slicing over tensor ranks: {}",
            group(),
            if plan.expert_slicing { "yes" } else { "no" }
        ),
    }
}

/// Memory per rank, by stage.
fn memory(o: &mut String, plan: &ParallelPlan) {
    let model = plan
        .stages
        .first()
        .map(|s| s.cost.memory.model)
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "\nmemory per rank for {} (every rank of a stage alike)",
        model.describe()
    );
    let _ = writeln!(
        o,
        "  stage  layers    params/rank      weights       grads   optimizer  activations (in flight)       total  of GPU"
    );
    for s in &plan.stages {
        let m = &s.cost.memory;
        let _ = writeln!(
            o,
            "  {:>5}  {:<8} {:>12} {:>12} {:>11} {:>11} {:>12} {:<9}{:>11}  {:>5.1}%",
            s.stage,
            layers(s),
            count(s.cost.params.total),
            bytes(m.weights),
            bytes(m.grads),
            bytes(m.optimizer),
            bytes(m.activations),
            format!("(×{})", m.in_flight),
            bytes(m.total),
            100.0 * m.total as f64 / m.capacity.max(1) as f64
        );
    }
    // Megatron-Core's figures assume Transformer Engine's fused attention; the emitted
    // train.sh falls back to the local modules without it, which keep the scores.
    if let Some(worst) = plan
        .stages
        .iter()
        .map(|s| &s.cost.memory)
        .filter(|m| m.unfused_attention > 0)
        .max_by_key(|m| m.total.saturating_add(m.unfused_attention))
    {
        let total = worst.total.saturating_add(worst.unfused_attention);
        let _ = writeln!(
            o,
            "  without Transformer Engine (train.sh falls back to Megatron's local attention, which keeps\n  \
             the attention probabilities, their dropout mask and output): up to {} more, {} ({:.1}% of GPU)",
            bytes(worst.unfused_attention),
            bytes(total),
            100.0 * total as f64 / worst.capacity.max(1) as f64
        );
    }
}

/// Parameters per rank by kind, by stage.
fn params_by_kind(o: &mut String, plan: &ParallelPlan) {
    let _ = writeln!(o, "\nparameters per rank by kind");
    let _ = writeln!(
        o,
        "  stage  tensor-sharded    replicated          gate        expert"
    );
    for s in &plan.stages {
        let r = &s.cost.params;
        let _ = writeln!(
            o,
            "  {:>5}  {:>14} {:>13} {:>13} {:>13}",
            s.stage,
            count(r.sharded),
            count(r.replicated),
            count(r.gate),
            count(r.expert)
        );
    }
}

/// The MoE layers, rows that differ only in the layer index printed once.
fn moe_layers(o: &mut String, plan: &ParallelPlan) {
    if !plan.moe_layers.is_empty() {
        let _ = writeln!(o, "\nmoe layers");
        let _ = writeln!(
            o,
            "  layers              stage  experts  top_k  per rank  hidden  hidden/rank  capacity"
        );
        // Rows that differ only in the layer index are printed once.
        let mut rows: Vec<(String, Vec<usize>)> = Vec::new();
        for m in &plan.moe_layers {
            let row = format!(
                "{:>5}  {:>7}  {:>5}  {:>8}  {:>6}  {:>11}  {}",
                m.stage,
                m.experts,
                m.top_k,
                m.experts_per_rank,
                m.expert_hidden,
                m.hidden_per_rank,
                m.capacity.map_or("none".into(), |c| format!("{c}"))
            );
            match rows.last_mut() {
                Some((r, layers)) if *r == row => layers.push(m.layer),
                _ => rows.push((row, vec![m.layer])),
            }
        }
        for (row, layers) in rows {
            let _ = writeln!(o, "  {:<18}  {row}", layer_list(&layers));
        }
    }
}

/// Every rank's coordinates, memory and the experts it holds.
fn ranks(o: &mut String, plan: &ParallelPlan) {
    let _ = writeln!(o, "\nranks");
    let _ = writeln!(
        o,
        "  rank  node  tensor  pipeline  data  expert       memory  experts held (global ids per layer)"
    );
    for r in &plan.ranks {
        // Group layers holding the same ids and slice so long models stay readable.
        let mut held: Vec<(String, Vec<usize>)> = Vec::new();
        for e in &r.experts {
            let key = format!("{} [hidden {}..{}]", ids(&e.ids), e.hidden[0], e.hidden[1]);
            match held.iter_mut().find(|(k, _)| *k == key) {
                Some((_, layers)) => layers.push(e.layer),
                None => held.push((key, vec![e.layer])),
            }
        }
        let held: Vec<String> = held
            .iter()
            .map(|(k, ls)| {
                let s = if ls.len() == 1 { "" } else { "s" };
                format!("layer{s} {}: {k}", layer_list(ls))
            })
            .collect();
        let _ = writeln!(
            o,
            "  {:>4}  {:>4}  {:>6}  {:>8}  {:>4}  {:>6}  {:>11}  {}",
            r.rank,
            r.node,
            r.tensor_rank,
            r.pipeline_rank,
            r.data_rank,
            r.expert_rank,
            bytes(r.memory_bytes),
            if held.is_empty() {
                "-".into()
            } else {
                held.join("; ")
            }
        );
    }
}

/// The process groups (the first eight of each kind).
fn groups(o: &mut String, plan: &ParallelPlan) {
    let g = &plan.groups;
    let _ = writeln!(o, "\ngroups");
    for (name, gs) in [
        ("tensor", &g.tensor),
        ("pipeline", &g.pipeline),
        ("data", &g.data),
        ("model", &g.model),
        ("expert", &g.expert),
        ("expert_data", &g.expert_data),
        ("gate", &g.gate),
        ("embedding", &g.embedding),
    ] {
        let _ = writeln!(o, "  {:<12} {}", name, group_line(gs, 8));
    }
    if let Some(core) = &plan.megatron_core {
        let _ = writeln!(
            o,
            "  {:<12} {}",
            "expert_tensor",
            group_line(&core.expert_tensor_groups, 8)
        );
    }
}

/// Bytes each rank sends per step, by stage.
fn traffic(o: &mut String, plan: &ParallelPlan) {
    let _ = writeln!(
        o,
        "\ntraffic per rank per step (bytes sent; all-reduce: buffer size)"
    );
    let _ = writeln!(
        o,
        "  stage  tensor a-r   all-to-all      data a-r  expert-data a-r     gate a-r   embedding a-r  pipeline send"
    );
    for s in &plan.stages {
        let t = &s.cost.traffic;
        let _ = writeln!(
            o,
            "  {:>5}  {:>10}  {:>11}  {:>12}  {:>15}  {:>11}  {:>14}  {:>13}",
            s.stage,
            bytes(t.tensor_allreduce_bytes),
            bytes(t.all_to_all_bytes),
            bytes(t.data_allreduce_bytes),
            bytes(t.expert_data_allreduce_bytes),
            bytes(t.gate_allreduce_bytes),
            bytes(t.embedding_allreduce_bytes),
            bytes(t.pipeline_send_bytes)
        );
    }
    if let Some(x) = plan
        .stages
        .iter()
        .flat_map(|s| s.cost.traffic.all_to_all.first())
        .next()
    {
        let _ = writeln!(
            o,
            "  all-to-all per MoE layer per micro-batch: {} forward, {} backward (layer {}, balanced routing)",
            bytes(x.fwd_bytes),
            bytes(x.bwd_bytes),
            x.layer
        );
    }
}

/// The time estimate per stage and for the step.
fn time(o: &mut String, plan: &ParallelPlan) {
    let pipelined = plan
        .fastermoe
        .as_ref()
        .is_some_and(|f| f.layers.iter().any(|x| x.chunks > 1));
    let _ = writeln!(
        o,
        "\ntime per rank (estimate: peak {:.0} TFLOP/s, weights at {:.0} GB/s, link bandwidth, {})",
        plan.time.peak_tflops,
        plan.hardware.hbm_gbps,
        if pipelined {
            "all-to-all overlapped with the experts in chunks (below)"
        } else {
            "no overlap"
        }
    );
    let _ = writeln!(
        o,
        "  stage      compute      weights       tensor   all-to-all     pipeline  micro-batch  gradient sync"
    );
    for s in &plan.stages {
        let t = &s.cost.time;
        let _ = writeln!(
            o,
            "  {:>5}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {:>11}  {:>13}",
            s.stage,
            secs(t.compute_s),
            secs(t.weight_traffic_s),
            secs(t.tensor_s),
            secs(t.all_to_all_s),
            secs(t.pipeline_s),
            secs(t.micro_batch_s),
            secs(t.gradient_sync_s)
        );
    }
    let t = &plan.time;
    let _ = writeln!(
        o,
        "  step {}, pipeline bubble {:.1}%, {} tokens/s, MFU {:.1}% (upper bound)",
        secs(t.step_s),
        100.0 * t.bubble_fraction,
        count(t.tokens_per_s.round() as u64),
        100.0 * t.mfu
    );
}

/// `chunks(4)`, `auto`, `off`.
pub fn smart_schedule_name(s: SmartSchedule) -> String {
    match s {
        SmartSchedule::Off => "off".into(),
        SmartSchedule::Auto => "auto".into(),
        SmartSchedule::Chunks { count } => format!("chunks({count})"),
    }
}

/// The expert exchange under FasterMoE's options, per MoE layer.
fn fastermoe_table(o: &mut String, f: &FasterMoePlan) {
    let skew = if f.routing_skew <= 1.0 {
        "balanced routing".to_string()
    } else {
        format!(
            "routing skew {} (the busiest expert {}x the mean)",
            f.routing_skew, f.routing_skew
        )
    };
    let _ = writeln!(
        o,
        "\nexpert exchange (FasterMoE): smart_schedule = {}, shadowing = {}, {skew}",
        smart_schedule_name(f.smart_schedule),
        match f.shadowing {
            Shadowing::Off => "off",
            Shadowing::Dynamic => "dynamic",
        }
    );
    let _ = writeln!(
        o,
        "  per micro-batch, forward and backward, on the busiest rank of the expert group"
    );
    let dynamic = f.shadowing == Shadowing::Dynamic;
    let _ = writeln!(
        o,
        "  layers              chunks  shadowed  plain EP     planned{}",
        if dynamic { "" } else { "  shadowing would" }
    );
    let mut rows: Vec<(String, Vec<usize>)> = Vec::new();
    for x in &f.layers {
        let mut row = format!(
            "{:>6}  {:>8}  {:>11}  {:>11}",
            x.chunks,
            x.shadowed,
            secs(x.plain_s),
            secs(x.planned_s)
        );
        if !dynamic {
            let _ = write!(
                row,
                "  {} ({})",
                crate::diag::count(x.would_shadow, "expert", "experts"),
                secs(x.with_shadowing_s)
            );
        }
        match rows.last_mut() {
            Some((r, layers)) if *r == row => layers.push(x.layer),
            _ => rows.push((row, vec![x.layer])),
        }
    }
    for (row, layers) in rows {
        let _ = writeln!(o, "  {:<18}  {row}", layer_list(&layers));
    }
}

/// The JSON document (pretty, trailing newline).
pub fn json(plan: &ParallelPlan) -> String {
    let mut s =
        serde_json::to_string_pretty(plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// The model graph as DOT, one cluster per pipeline stage of the plan.
pub fn dot(plan: &ParallelPlan, graph: &ModelGraph) -> String {
    let stage_of = |l: usize| {
        let l = l as u64;
        plan.stages
            .iter()
            .find(|s| {
                (s.first_layer..s.end_layer).contains(&l)
                    || s.chunks.iter().any(|c| (c[0]..c[1]).contains(&l))
            })
            .map_or(0, |s| s.stage)
    };
    graph.to_dot(plan.pipeline, stage_of)
}

/// A stage's blocks: `4..8`, or with model chunks `0..2,8..10`.
fn layers(s: &super::Stage) -> String {
    if s.chunks.is_empty() {
        format!("{}..{}", s.first_layer, s.end_layer)
    } else {
        let chunks: Vec<String> = s
            .chunks
            .iter()
            .map(|c| format!("{}..{}", c[0], c[1]))
            .collect();
        chunks.join(",")
    }
}
