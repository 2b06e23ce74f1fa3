//! The gates (routers) of an MoE layer: one definition of each, the single place that says
//! which gates exist, how many experts each routes a token to and which parameters it has.
//!
//! Read by the checker (a gate's name, unknown names refused, its `top_k`), the graph (its
//! parameter count), the runtime (the parameters it creates) and emit (the generated module's
//! gate table). The defaults of a gate's arguments (capacity, balance loss, jitter, random
//! routing) are its signature's in `stdlib/gates.fmoe`, the one home of what a user may write;
//! `check::gate_defaults` evaluates them. A test keeps this table and the stdlib's gate
//! constructors the same set.
//!
//! Must not know about tensors, source text or templates.

use crate::check::GateKind;

/// The shape of a gate parameter, in the model's width `d` and the layer's expert count `E`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateShape {
    /// `[d, E]`: a projection of the token onto the experts.
    WidthByExperts,
    /// `[E]`.
    Experts,
}

impl GateShape {
    pub fn dims(self, width: u64, experts: u64) -> Vec<u64> {
        match self {
            GateShape::WidthByExperts => vec![width, experts],
            GateShape::Experts => vec![experts],
        }
    }
}

/// One parameter of a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateParam {
    /// Its name under the gate (`weight`, `bias`, `noise`).
    pub name: &'static str,
    pub shape: GateShape,
    /// A bias: present only when the model's linear layers carry biases (`bias = true`).
    pub is_bias: bool,
}

/// One gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateDef {
    pub kind: GateKind,
    /// As the stdlib declares it and the generated module names it.
    pub name: &'static str,
    /// `Some(k)`: routes every token to exactly `k` experts (`top_k` must be `k`).
    pub top_k: Option<u64>,
    pub params: &'static [GateParam],
    /// The class of the generated module that implements it.
    pub python_class: &'static str,
}

const SCORES: GateParam = GateParam {
    name: "weight",
    shape: GateShape::WidthByExperts,
    is_bias: false,
};
const SCORES_BIAS: GateParam = GateParam {
    name: "bias",
    shape: GateShape::Experts,
    is_bias: true,
};
/// The noisy gate's projection onto the noise's standard deviation.
const NOISE: GateParam = GateParam {
    name: "noise",
    shape: GateShape::WidthByExperts,
    is_bias: false,
};

/// Every gate, in the order the stdlib declares them.
pub const GATES: &[GateDef] = &[
    GateDef {
        kind: GateKind::Naive,
        name: "naive",
        top_k: None,
        params: &[SCORES, SCORES_BIAS],
        python_class: "NaiveGate",
    },
    GateDef {
        kind: GateKind::Noisy,
        name: "noisy",
        top_k: None,
        // FastMoE's NoisyGate: w_gate and w_noise, no bias
        params: &[SCORES, NOISE],
        python_class: "NoisyGate",
    },
    GateDef {
        kind: GateKind::Gshard,
        name: "gshard",
        top_k: Some(2),
        params: &[SCORES, SCORES_BIAS],
        python_class: "GShardGate",
    },
    GateDef {
        kind: GateKind::Switch,
        name: "switch",
        top_k: Some(1),
        params: &[SCORES, SCORES_BIAS],
        python_class: "SwitchGate",
    },
    GateDef {
        kind: GateKind::Swipe,
        name: "swipe",
        top_k: None,
        params: &[SCORES, SCORES_BIAS],
        python_class: "SwipeGate",
    },
];

/// The gates' names, in [`GATES`]'s order (a constant for tables that need one).
pub const NAMES: &[&str] = &["naive", "noisy", "gshard", "switch", "swipe"];

/// The gate of this name, if fmoec implements one.
pub fn by_name(name: &str) -> Option<&'static GateDef> {
    GATES.iter().find(|g| g.name == name)
}

/// The definition of a gate kind.
pub fn of(kind: GateKind) -> &'static GateDef {
    GATES
        .iter()
        .find(|g| g.kind == kind)
        .expect("every GateKind has a definition")
}

impl GateDef {
    /// The parameters a gate of a model with (`bias`) or without biases has.
    pub fn params_with(&self, bias: bool) -> impl Iterator<Item = &'static GateParam> {
        self.params.iter().filter(move |p| bias || !p.is_bias)
    }

    /// Its parameter count over `experts` experts of a model of `width`.
    pub fn param_count(&self, width: u64, experts: u64, bias: bool) -> u64 {
        self.params_with(bias)
            .map(|p| p.shape.dims(width, experts).iter().product::<u64>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_table_and_every_kind_has_one_definition() {
        let names: Vec<&str> = GATES.iter().map(|g| g.name).collect();
        assert_eq!(names, NAMES);
        for g in GATES {
            assert_eq!(of(g.kind), g);
            assert_eq!(by_name(g.name), Some(g));
        }
        assert_eq!(by_name("mixtral"), None);
    }

    #[test]
    fn parameter_counts() {
        // naive over 8 experts of width 16: 16 x 8 + 8 (bias); without biases 128
        assert_eq!(of(GateKind::Naive).param_count(16, 8, true), 136);
        assert_eq!(of(GateKind::Naive).param_count(16, 8, false), 128);
        // noisy: w_gate and w_noise, never a bias
        assert_eq!(of(GateKind::Noisy).param_count(16, 8, true), 256);
    }
}
