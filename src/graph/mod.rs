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

use crate::check::{Ffn, Layer, Mlp, Model, Moe, Norm, Positions, SharedExperts};

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
///
/// In forward order, as the graph's invariant wants its nodes: the embedding, each block
/// (its attention half, then its feed-forward half), then the head. Node and edge order
/// is what [`ModelGraph::to_dot`] numbers and prints, so the phases keep it.
pub fn lower(model: &Model, seq_len: u64) -> ModelGraph {
    let mut l = Lowering {
        model,
        seq_len,
        hidden: bsh(model.width),
        graph: DiGraph::new(),
        last: None,
    };
    l.embedding();
    for layer in &model.layers {
        let residual1 = l.attention_half(layer.index);
        l.feed_forward_half(layer, residual1);
    }
    l.head();
    ModelGraph {
        graph: l.graph,
        seq_len,
        depth: model.layers.len(),
        tied_embeddings: model.tied_embeddings,
        word_embedding_params: word_embedding_params(model),
    }
}

/// Parameters of the token embedding alone: the matrix Megatron splits over tensor ranks
/// by vocabulary, and the one an untied LM head has a copy of.
fn word_embedding_params(model: &Model) -> u64 {
    model.vocab * model.width
}

/// The graph while [`lower`] builds it: the model it lowers, and the node the next one
/// follows on the main path.
struct Lowering<'m> {
    model: &'m Model,
    /// Tokens per sequence the attention FLOPs are counted for.
    seq_len: u64,
    /// `[b, s, width]`: the activation between a block's nodes.
    hidden: Shape,
    graph: DiGraph<Node, Edge>,
    /// The node last pushed on the main path (the one the next pushed node follows).
    last: Option<NodeIndex>,
}

impl Lowering<'_> {
    /// Adds `node` after the last one on the main path, joined by its input, and makes it the
    /// last.
    fn push(&mut self, node: Node) -> NodeIndex {
        let shape = node.input.clone();
        let i = self.graph.add_node(node);
        if let Some(prev) = self.last {
            self.graph.add_edge(prev, i, Edge { shape });
        }
        self.last = Some(i);
        i
    }

    /// A `[b, s, width]` edge beside the main path (a residual's skip, the shared experts).
    fn edge(&mut self, from: NodeIndex, to: NodeIndex) {
        let shape = self.hidden.clone();
        self.graph.add_edge(from, to, Edge { shape });
    }

    /// `[b, s, width]` in and out.
    fn hidden_to_hidden(&self) -> (Shape, Shape) {
        (self.hidden.clone(), self.hidden.clone())
    }

    /// A norm's parameters, copied on every tensor rank.
    fn norm_params(&self) -> Params {
        replicated(norm_params(self.model.norm, self.model.width))
    }

    /// The token embedding: Megatron splits the word embedding over tensor ranks by
    /// vocabulary; learned positions are copied.
    fn embedding(&mut self) {
        let m = self.model;
        let positions = match m.positions {
            Positions::Learned => m.context * m.width,
            Positions::Rotary => 0,
        };
        self.push(node(
            "embedding".into(),
            NodeKind::Embedding,
            None,
            (Shape(vec![Dim::Batch, Dim::Seq]), self.hidden.clone()),
            Params {
                sharded: word_embedding_params(m),
                replicated: positions,
                ..Params::default()
            },
            0,
        ));
    }

    /// Block `i`'s first norm, attention and the residual that adds the block's input back;
    /// returns that residual.
    fn attention_half(&mut self, i: usize) -> NodeIndex {
        let m = self.model;
        let (att, w, bias) = (&m.attention, m.width, m.bias);
        let stream = self.last;
        self.push(node(
            block_node(i, "norm1"),
            NodeKind::Norm,
            Some(i),
            self.hidden_to_hidden(),
            self.norm_params(),
            0,
        ));
        let qkv_out = (att.heads + 2 * att.kv_heads) * att.head_dim;
        let proj_in = att.heads * att.head_dim;
        self.push(node(
            block_node(i, "attention"),
            NodeKind::Attention,
            Some(i),
            self.hidden_to_hidden(),
            Params {
                sharded: linear(w, qkv_out, bias) + proj_in * w,
                replicated: if bias { w } else { 0 },
                ..Params::default()
            },
            2 * w * qkv_out + 2 * proj_in * w + 4 * self.seq_len * proj_in,
        ));
        let residual1 = self.push(node(
            block_node(i, "residual1"),
            NodeKind::Residual,
            Some(i),
            self.hidden_to_hidden(),
            Params::default(),
            0,
        ));
        if let Some(s) = stream {
            self.edge(s, residual1);
        }
        residual1
    }

    /// The block's second norm, its feed-forward network (a dense MLP or an MoE layer) and
    /// the residual that adds `residual1` (and the shared experts' output) back.
    fn feed_forward_half(&mut self, layer: &Layer, residual1: NodeIndex) {
        let i = layer.index;
        self.push(node(
            block_node(i, "norm2"),
            NodeKind::Norm,
            Some(i),
            self.hidden_to_hidden(),
            self.norm_params(),
            0,
        ));
        let shared = match &layer.ffn {
            Ffn::Dense(mlp) => {
                self.push(node(
                    block_node(i, "mlp"),
                    NodeKind::Mlp,
                    Some(i),
                    self.hidden_to_hidden(),
                    mlp_params(self.model.width, mlp, self.model.bias),
                    mlp_flops(self.model.width, mlp),
                ));
                None
            }
            Ffn::Moe(moe) => {
                let input = self.last;
                self.routed_experts(i, moe);
                let shared = moe.shared.as_ref();
                shared.map(|shared| self.shared_experts(i, shared, input))
            }
        };
        let residual2 = self.push(node(
            block_node(i, "residual2"),
            NodeKind::Residual,
            Some(i),
            self.hidden_to_hidden(),
            Params::default(),
            0,
        ));
        if let Some(s) = shared {
            self.edge(s, residual2);
        }
        self.edge(residual1, residual2);
    }

    /// MoE layer `i`'s gate, dispatch, experts and combine on the main path (the combine
    /// last); the dispatch also takes the layer's input from beside the gate.
    fn routed_experts(&mut self, i: usize, moe: &Moe) {
        let (w, bias) = (self.model.width, self.model.bias);
        let h = self.hidden.clone();
        let input = self.last;
        let scores = Shape(vec![Dim::Batch, Dim::Seq, Dim::Size(moe.top_k)]);
        self.push(node(
            moe_node(i, "gate"),
            NodeKind::Gate,
            Some(i),
            (h.clone(), scores),
            Params {
                gate: gate_params(w, moe, bias),
                ..Params::default()
            },
            2 * w * moe.experts,
        ));
        let routed = Shape(vec![Dim::Routed, Dim::Size(w)]);
        let dispatch = self.push(node(
            moe_node(i, "dispatch"),
            NodeKind::Dispatch,
            Some(i),
            (h.clone(), routed.clone()),
            Params::default(),
            0,
        ));
        if let Some(x) = input {
            self.edge(x, dispatch);
        }
        let one = mlp_params(w, &moe.expert, bias);
        self.push(node(
            moe_node(i, "experts"),
            NodeKind::Experts,
            Some(i),
            (routed.clone(), routed.clone()),
            Params {
                expert: moe.experts * one.total(),
                ..Params::default()
            },
            moe.top_k * mlp_flops(w, &moe.expert),
        ));
        self.push(node(
            moe_node(i, "combine"),
            NodeKind::Combine,
            Some(i),
            (routed, h),
            Params::default(),
            0,
        ));
    }

    /// MoE layer `i`'s shared experts, beside the routed ones from the layer's `input`: not
    /// on the main path (the combine stays last); the caller joins them at the residual.
    fn shared_experts(
        &mut self,
        i: usize,
        shared: &SharedExperts,
        input: Option<NodeIndex>,
    ) -> NodeIndex {
        // The shared experts are one MLP of `count` times the hidden size (DeepSeek-MoE's
        // form, and the runtime's): one output bias, not one per expert.
        let mlp = Mlp {
            hidden: shared.count * shared.expert.hidden,
            act: shared.expert.act,
            span: shared.expert.span,
        };
        let w = self.model.width;
        let s = self.graph.add_node(node(
            moe_node(i, "shared_experts"),
            NodeKind::SharedExperts,
            Some(i),
            self.hidden_to_hidden(),
            mlp_params(w, &mlp, self.model.bias),
            mlp_flops(w, &mlp),
        ));
        if let Some(x) = input {
            self.edge(x, s);
        }
        s
    }

    /// The final norm, the LM head (its own matrix unless tied to the embedding) and the
    /// loss.
    fn head(&mut self) {
        let m = self.model;
        self.push(node(
            "final_norm".into(),
            NodeKind::FinalNorm,
            None,
            self.hidden_to_hidden(),
            self.norm_params(),
            0,
        ));
        let logits = Shape(vec![Dim::Batch, Dim::Seq, Dim::Size(m.vocab)]);
        self.push(node(
            "lm_head".into(),
            NodeKind::LmHead,
            None,
            (self.hidden.clone(), logits.clone()),
            Params {
                sharded: if m.tied_embeddings {
                    0
                } else {
                    word_embedding_params(m)
                },
                ..Params::default()
            },
            2 * m.width * m.vocab,
        ));
        self.push(node(
            "loss".into(),
            NodeKind::Loss,
            None,
            (logits, Shape(vec![])),
            Params::default(),
            0,
        ));
    }
}

/// The name of block `i`'s node `part`: `layers.3.attention`.
fn block_node(i: usize, part: &str) -> String {
    format!("layers.{i}.{part}")
}

/// The name of MoE layer `i`'s node `part`: `layers.3.moe.gate`.
fn moe_node(i: usize, part: &str) -> String {
    format!("layers.{i}.moe.{part}")
}
