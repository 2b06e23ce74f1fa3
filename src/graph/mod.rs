//! `graph`: the [`ModelGraph`], the checked model lowered to a graph of operations.
//!
//! Owns the op-level view of a model: one node per embedding, norm, attention, residual,
//! dense MLP, MoE part (gate, dispatch, experts, combine, shared experts), final norm, LM
//! head and loss; each node with its tensor shapes, its parameters by kind and its
//! matmul FLOPs per token. It is built on petgraph but exposes only its own types.
//!
//! It knows the model, not the machine: no ranks, groups or bytes (that is `plan`), no
//! tensors or kernels (that is `runtime`). The only plan-shaped input it accepts is the
//! stage of each block, for drawing clusters in [`ModelGraph::to_dot`].
//!
//! # Counting conventions
//! - Parameters: linear layers `in*out` (+ `out` with `bias`); LayerNorm `2*width`,
//!   RMSNorm `width`; token embedding `vocab*width`; learned positions `context*width`;
//!   gate `width*experts` (+ `experts` with `bias`; a noisy gate has a second, noise
//!   matrix and no bias); an untied LM head `vocab*width` without bias; a SwiGLU MLP three
//!   matrices and the biases of a GELU one (`hidden` after the up projections, `width`
//!   after the down one).
//! - FLOPs: matmul FLOPs only, 2 per multiply-add, as Megatron-LM counts them for MFU;
//!   elementwise ops (norms, activations, softmax, residual adds) count 0. Attention adds
//!   `4*seq*width` per token for `QK^T` and `AV` (no discount for the causal mask).
//!   Backward is twice the forward. Routed experts cost `top_k` expert MLPs per token.

use std::fmt;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::check::{Ffn, Mlp, Model, Moe, Norm, Positions};

/// One dimension of an activation shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    /// Sequences in a micro-batch (`b`).
    Batch,
    /// Tokens per sequence (`s`).
    Seq,
    /// Token-to-expert assignments of a micro-batch (`b*s*top_k`).
    Routed,
    /// A fixed size.
    Size(u64),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => write!(f, "b"),
            Dim::Seq => write!(f, "s"),
            Dim::Routed => write!(f, "b*s*k"),
            Dim::Size(n) => write!(f, "{n}"),
        }
    }
}

/// An activation shape, outermost dimension first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shape(pub Vec<Dim>);

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

fn bsh(width: u64) -> Shape {
    Shape(vec![Dim::Batch, Dim::Seq, Dim::Size(width)])
}

/// A node's parameters by how tensor and expert parallelism place them.
///
/// Follows Megatron-LM: column-parallel weights and biases and row-parallel weights
/// are split over tensor ranks (`sharded`); row-parallel biases, norms and learned
/// positions are copied on every tensor rank (`replicated`). FastMoE's gate is copied
/// on every rank of a pipeline stage (`gate`); routed experts (`expert`, all experts of
/// the layer) are spread over the expert group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Params {
    pub sharded: u64,
    pub replicated: u64,
    pub gate: u64,
    pub expert: u64,
}

impl Params {
    pub fn total(&self) -> u64 {
        self.sharded + self.replicated + self.gate + self.expert
    }

    fn add(&mut self, o: Params) {
        self.sharded += o.sharded;
        self.replicated += o.replicated;
        self.gate += o.gate;
        self.expert += o.expert;
    }
}

/// What a node computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Token embedding (and learned positions when the model has them).
    Embedding,
    Norm,
    Attention,
    Residual,
    /// A dense feed-forward network.
    Mlp,
    /// MoE gate: scores, top-k, balance loss.
    Gate,
    /// Sends each token to its experts (the forward all-to-all under expert parallelism).
    Dispatch,
    /// The routed experts of one layer.
    Experts,
    /// Weighted sum of the expert outputs, returned to the token's rank.
    Combine,
    /// Always-on shared experts (DeepSeek-MoE).
    SharedExperts,
    FinalNorm,
    LmHead,
    Loss,
}

/// One operation of the model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    /// Dotted path, stable across runs: `embedding`, `layers.3.attention`, `lm_head`.
    pub name: String,
    pub kind: NodeKind,
    /// The block this node belongs to; `None` for embedding, final norm, head and loss.
    pub layer: Option<usize>,
    pub input: Shape,
    pub output: Shape,
    pub params: Params,
    /// Matmul FLOPs per token of the forward pass.
    pub flops_fwd: u64,
    /// Matmul FLOPs per token of the backward pass (twice the forward).
    pub flops_bwd: u64,
}

/// A data-flow edge: the activation passed from one node to the next.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Edge {
    pub shape: Shape,
}

/// The model as a graph of operations.
///
/// Invariant: nodes are added in a topological order (`nodes()` returns them in it),
/// every block's nodes carry `layer = Some(i)` for `i < depth`, and the parameter
/// counts sum to the model's parameter count.
#[derive(Clone, Debug)]
pub struct ModelGraph {
    graph: DiGraph<Node, Edge>,
    /// Tokens per sequence the attention FLOPs were counted for.
    pub seq_len: u64,
    pub depth: usize,
    pub tied_embeddings: bool,
    /// Parameters of the token embedding alone (the matrix an LM head may share).
    pub word_embedding_params: u64,
}

/// Identifies a node of a [`ModelGraph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(NodeIndex);

impl ModelGraph {
    /// Nodes in topological (forward) order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.graph
            .node_indices()
            .map(move |i| (NodeId(i), &self.graph[i]))
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id.0]
    }

    /// Edges as (from, to, activation).
    pub fn edges(&self) -> impl Iterator<Item = (NodeId, NodeId, &Edge)> {
        self.graph
            .raw_edges()
            .iter()
            .map(|e| (NodeId(e.source()), NodeId(e.target()), &e.weight))
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// Parameters of the whole model by kind.
    pub fn params(&self) -> Params {
        let mut p = Params::default();
        for (_, n) in self.nodes() {
            p.add(n.params);
        }
        p
    }

    /// Parameters of nodes matching `keep`.
    pub fn params_where(&self, keep: impl Fn(&Node) -> bool) -> Params {
        let mut p = Params::default();
        for (_, n) in self.nodes().filter(|(_, n)| keep(n)) {
            p.add(n.params);
        }
        p
    }

    /// Forward + backward matmul FLOPs per token of the whole model.
    pub fn flops_per_token(&self) -> u64 {
        self.nodes().map(|(_, n)| n.flops_fwd + n.flops_bwd).sum()
    }

    /// Graphviz DOT. `stage_of_layer(i)` gives the pipeline stage of block `i`; nodes
    /// before the first block go to stage 0 and nodes after the last to the last stage.
    /// One `cluster_stageN` subgraph per stage. Byte-stable.
    pub fn to_dot(&self, stages: u64, stage_of_layer: impl Fn(usize) -> u64) -> String {
        let last = stages.saturating_sub(1);
        let stage_of = |n: &Node| match (n.layer, n.kind) {
            (Some(l), _) => stage_of_layer(l),
            (None, NodeKind::Embedding) => 0,
            (None, _) => last,
        };
        let mut out = String::from(
            "digraph model {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        for s in 0..stages.max(1) {
            out.push_str(&format!(
                "  subgraph cluster_stage{s} {{\n    label=\"pipeline stage {s}\";\n"
            ));
            for (id, n) in self.nodes().filter(|(_, n)| stage_of(n) == s) {
                out.push_str(&format!(
                    "    n{} [label=\"{}\\n{:?} {} -> {}\\nparams {}  fwd {} FLOP/token\"];\n",
                    id.0.index(),
                    n.name,
                    n.kind,
                    n.input,
                    n.output,
                    n.params.total(),
                    n.flops_fwd
                ));
            }
            out.push_str("  }\n");
        }
        for (a, b, e) in self.edges() {
            out.push_str(&format!(
                "  n{} -> n{} [label=\"{}\"];\n",
                a.0.index(),
                b.0.index(),
                e.shape
            ));
        }
        out.push_str("}\n");
        out
    }
}

/// Parameters of a linear layer `inp -> out`, with or without bias.
fn linear(inp: u64, out: u64, bias: bool) -> u64 {
    inp * out + if bias { out } else { 0 }
}

fn norm_params(norm: Norm, width: u64) -> u64 {
    match norm {
        Norm::LayerNorm => 2 * width,
        Norm::RmsNorm => width,
    }
}

/// Parameters of one MLP split as Megatron places them: the first matrix (or the two
/// gated ones) column-parallel, the second row-parallel with its bias copied on every
/// tensor rank. One bias of `hidden` follows the up projection: SwiGLU's gate matrix
/// (`w3`) has none, as in the runtime and the emitted module (`silu(x·w3) * (x·w1 + b1)`).
pub fn mlp_params(width: u64, mlp: &Mlp, bias: bool) -> Params {
    let up = mlp.act.matrices() - 1;
    let col = up * width * mlp.hidden + if bias { mlp.hidden } else { 0 };
    Params {
        sharded: col + width * mlp.hidden,
        replicated: if bias { width } else { 0 },
        gate: 0,
        expert: 0,
    }
}

/// Forward matmul FLOPs per token of one MLP.
pub fn mlp_flops(width: u64, mlp: &Mlp) -> u64 {
    2 * mlp.act.matrices() * width * mlp.hidden
}

/// Parameters of a gate over `experts` experts.
pub fn gate_params(width: u64, moe: &Moe, bias: bool) -> u64 {
    crate::gates::of(moe.gate.kind).param_count(width, moe.experts, bias)
}

struct Builder {
    graph: DiGraph<Node, Edge>,
    last: Option<NodeIndex>,
}

impl Builder {
    fn push(&mut self, node: Node) -> NodeIndex {
        let shape = node.input.clone();
        let i = self.graph.add_node(node);
        if let Some(prev) = self.last {
            self.graph.add_edge(prev, i, Edge { shape });
        }
        self.last = Some(i);
        i
    }

    fn edge(&mut self, from: NodeIndex, to: NodeIndex, shape: Shape) {
        self.graph.add_edge(from, to, Edge { shape });
    }
}

fn node(
    name: String,
    kind: NodeKind,
    layer: Option<usize>,
    io: (Shape, Shape),
    params: Params,
    flops_fwd: u64,
) -> Node {
    Node {
        name,
        kind,
        layer,
        input: io.0,
        output: io.1,
        params,
        flops_fwd,
        flops_bwd: 2 * flops_fwd,
    }
}

fn replicated(n: u64) -> Params {
    Params {
        replicated: n,
        ..Params::default()
    }
}

/// Lowers a checked model. `seq_len` is the sequence length the attention FLOPs are
/// counted for (the `train` block's, or the model's context).
pub fn lower(model: &Model, seq_len: u64) -> ModelGraph {
    let w = model.width;
    let bias = model.bias;
    let h = bsh(w);
    let mut b = Builder {
        graph: DiGraph::new(),
        last: None,
    };
    let positions = match model.positions {
        Positions::Learned => model.context * w,
        Positions::Rotary => 0,
    };
    // Megatron splits the word embedding over tensor ranks by vocabulary; positions are
    // copied.
    b.push(node(
        "embedding".into(),
        NodeKind::Embedding,
        None,
        (Shape(vec![Dim::Batch, Dim::Seq]), h.clone()),
        Params {
            sharded: model.vocab * w,
            replicated: positions,
            ..Params::default()
        },
        0,
    ));
    let att = &model.attention;
    for layer in &model.layers {
        let i = layer.index;
        let p = |s: &str| format!("layers.{i}.{s}");
        let stream = b.last;
        b.push(node(
            p("norm1"),
            NodeKind::Norm,
            Some(i),
            (h.clone(), h.clone()),
            replicated(norm_params(model.norm, w)),
            0,
        ));
        let qkv_out = (att.heads + 2 * att.kv_heads) * att.head_dim;
        let proj_in = att.heads * att.head_dim;
        b.push(node(
            p("attention"),
            NodeKind::Attention,
            Some(i),
            (h.clone(), h.clone()),
            Params {
                sharded: linear(w, qkv_out, bias) + proj_in * w,
                replicated: if bias { w } else { 0 },
                ..Params::default()
            },
            2 * w * qkv_out + 2 * proj_in * w + 4 * seq_len * proj_in,
        ));
        let r1 = b.push(node(
            p("residual1"),
            NodeKind::Residual,
            Some(i),
            (h.clone(), h.clone()),
            Params::default(),
            0,
        ));
        if let Some(s) = stream {
            b.edge(s, r1, h.clone());
        }
        b.push(node(
            p("norm2"),
            NodeKind::Norm,
            Some(i),
            (h.clone(), h.clone()),
            replicated(norm_params(model.norm, w)),
            0,
        ));
        let shared = match &layer.ffn {
            Ffn::Dense(mlp) => {
                b.push(node(
                    p("mlp"),
                    NodeKind::Mlp,
                    Some(i),
                    (h.clone(), h.clone()),
                    mlp_params(w, mlp, bias),
                    mlp_flops(w, mlp),
                ));
                None
            }
            Ffn::Moe(moe) => lower_moe(&mut b, model, moe, i, &h),
        };
        let r2 = b.push(node(
            p("residual2"),
            NodeKind::Residual,
            Some(i),
            (h.clone(), h.clone()),
            Params::default(),
            0,
        ));
        if let Some(s) = shared {
            b.edge(s, r2, h.clone());
        }
        b.edge(r1, r2, h.clone());
    }
    b.push(node(
        "final_norm".into(),
        NodeKind::FinalNorm,
        None,
        (h.clone(), h.clone()),
        replicated(norm_params(model.norm, w)),
        0,
    ));
    let logits = Shape(vec![Dim::Batch, Dim::Seq, Dim::Size(model.vocab)]);
    b.push(node(
        "lm_head".into(),
        NodeKind::LmHead,
        None,
        (h.clone(), logits.clone()),
        Params {
            sharded: if model.tied_embeddings {
                0
            } else {
                model.vocab * w
            },
            ..Params::default()
        },
        2 * w * model.vocab,
    ));
    b.push(node(
        "loss".into(),
        NodeKind::Loss,
        None,
        (logits, Shape(vec![])),
        Params::default(),
        0,
    ));
    ModelGraph {
        graph: b.graph,
        seq_len,
        depth: model.layers.len(),
        tied_embeddings: model.tied_embeddings,
        word_embedding_params: model.vocab * w,
    }
}

/// Adds gate, dispatch, experts and combine (the last becomes `b.last`); returns the
/// shared-experts node, which runs beside them and joins at the residual.
fn lower_moe(b: &mut Builder, model: &Model, moe: &Moe, i: usize, h: &Shape) -> Option<NodeIndex> {
    let w = model.width;
    let p = |s: &str| format!("layers.{i}.moe.{s}");
    let input = b.last;
    let scores = Shape(vec![Dim::Batch, Dim::Seq, Dim::Size(moe.top_k)]);
    b.push(node(
        p("gate"),
        NodeKind::Gate,
        Some(i),
        (h.clone(), scores),
        Params {
            gate: gate_params(w, moe, model.bias),
            ..Params::default()
        },
        2 * w * moe.experts,
    ));
    let routed = Shape(vec![Dim::Routed, Dim::Size(w)]);
    let dispatch = b.push(node(
        p("dispatch"),
        NodeKind::Dispatch,
        Some(i),
        (h.clone(), routed.clone()),
        Params::default(),
        0,
    ));
    if let Some(x) = input {
        b.edge(x, dispatch, h.clone());
    }
    let one = mlp_params(w, &moe.expert, model.bias);
    b.push(node(
        p("experts"),
        NodeKind::Experts,
        Some(i),
        (routed.clone(), routed.clone()),
        Params {
            expert: moe.experts * one.total(),
            ..Params::default()
        },
        moe.top_k * mlp_flops(w, &moe.expert),
    ));
    let combine = b.push(node(
        p("combine"),
        NodeKind::Combine,
        Some(i),
        (routed, h.clone()),
        Params::default(),
        0,
    ));
    match &moe.shared {
        None => None,
        Some(shared) => {
            // The shared experts are one MLP of `count` times the hidden size (DeepSeek-MoE's
            // form, and the runtime's): one output bias, not one per expert.
            let mlp = Mlp {
                hidden: shared.count * shared.expert.hidden,
                act: shared.expert.act,
                span: shared.expert.span,
            };
            let params = mlp_params(w, &mlp, model.bias);
            let s = b.graph.add_node(node(
                p("shared_experts"),
                NodeKind::SharedExperts,
                Some(i),
                (h.clone(), h.clone()),
                params,
                mlp_flops(w, &mlp),
            ));
            if let Some(x) = input {
                b.edge(x, s, h.clone());
            }
            b.last = Some(combine);
            Some(s)
        }
    }
}
