//! Values of evaluated expressions and the types constructor parameters declare.
//! A value keeps the span of the expression it came from, so a later rule can point at
//! the text that produced it.

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use crate::diag::Span;

/// An evaluated expression and where it was written.
#[derive(Clone, Debug)]
pub struct V {
    pub value: Value,
    pub span: Span,
    /// How a number with a fraction came to be (for E0302's help); not part of the value:
    /// two `V`s are equal whatever their origins.
    pub fraction: Fraction,
}

impl PartialEq for V {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value && self.span == other.span
    }
}

/// How a number with a fraction came to be: written so (`2.5`, or a name that holds it),
/// made by a `/` (a division that is not exact, or arithmetic on the result of one), or by
/// other arithmetic on a written fraction (`width * 0.3`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fraction {
    #[default]
    Written,
    Divided,
    Computed,
}

impl V {
    pub fn new(value: Value, span: Span) -> Self {
        V {
            value,
            span,
            fraction: Fraction::Written,
        }
    }

    /// The same value pointing at `span` (a name's use, a definition's call): it keeps how
    /// its fraction came to be.
    pub fn at(self, span: Span) -> Self {
        V { span, ..self }
    }

    pub fn error(span: Span) -> Self {
        V::new(Value::Error, span)
    }

    pub fn is_error(&self) -> bool {
        matches!(self.value, Value::Error)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    Tuple(Vec<V>),
    /// A bare name that no scope defines: an enum variant if the expected type has it.
    Symbol(String),
    /// A checked constructor call with every parameter filled in.
    Ctor(Rc<CtorValue>),
    /// `32 x 1024 tokens`.
    Batch(Box<V>, Box<V>),
    /// `16 of h100_sxm`: the count and the hardware profile's name.
    Of(Box<V>, String),
    /// `across data`.
    Across(String),
    /// Something already reported; rules stay quiet about it.
    Error,
}

impl Value {
    /// How the value is described in "expected X, found Y".
    pub fn describe(&self) -> String {
        match self {
            Value::Int(i) => format!("the integer {i}"),
            Value::Float(f) => format!("the number {}", fmt_float(*f)),
            Value::Bool(b) => format!("`{b}`"),
            Value::Str(s) => format!("the string {s:?}"),
            Value::None => "`none`".into(),
            Value::Tuple(items) => format!("a tuple of {}", items.len()),
            Value::Symbol(s) => format!("`{s}`"),
            Value::Ctor(c) => format!("`{}(...)` (a {})", c.name, c.kind),
            Value::Batch(..) => "a batch shape (`x`)".into(),
            Value::Of(..) => "a GPU count (`of`)".into(),
            Value::Across(_) => "`across ...`".into(),
            Value::Error => "an erroneous value".into(),
        }
    }
}

/// Formats a float the way a user would write it (`1.2`, `3e-4`).
pub fn fmt_float(f: f64) -> String {
    if f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e15) {
        format!("{f:e}")
    } else if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// One argument of a checked constructor call.
#[derive(Clone, Debug, PartialEq)]
pub struct CtorArg {
    pub value: V,
    /// Written by the user (else taken from the parameter's default).
    pub explicit: bool,
}

/// A constructor call after its arguments were matched against the signature.
#[derive(Clone, Debug, PartialEq)]
pub struct CtorValue {
    pub name: String,
    /// What it makes (`gate`, `mlp`, `ffn`, ...), from the declaration.
    pub kind: String,
    pub args: BTreeMap<String, CtorArg>,
    pub span: Span,
    pub callee_span: Span,
}

impl CtorValue {
    pub fn arg(&self, name: &str) -> Option<&V> {
        self.args.get(name).map(|a| &a.value)
    }

    pub fn explicit(&self, name: &str) -> Option<&V> {
        self.args.get(name).filter(|a| a.explicit).map(|a| &a.value)
    }
}

/// A bound on a number (`> 0`, `<= 1`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub op: crate::syntax::ast::CmpOp,
    pub value: f64,
}

impl Bound {
    pub fn holds(&self, x: f64) -> bool {
        use crate::syntax::ast::CmpOp::*;
        match self.op {
            Gt => x > self.value,
            Ge => x >= self.value,
            Lt => x < self.value,
            Le => x <= self.value,
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.value.fract() == 0.0 && self.value.abs() < 1e15 {
            format!("{}", self.value as i64)
        } else {
            fmt_float(self.value)
        };
        write!(f, "{} {}", self.op.as_str(), v)
    }
}

/// The type of a constructor parameter or a block field.
#[derive(Clone, Debug, PartialEq)]
pub enum Type {
    Int(Vec<Bound>),
    Float(Vec<Bound>),
    Bool,
    Str,
    Tuple(Vec<Type>),
    /// One of these names.
    Enum(Vec<String>),
    /// A constructor result of this kind (`gate`, `ffn`, ...).
    Kind(String),
    /// May be `none`.
    Optional(Box<Type>),
}

impl Type {
    /// `int(>= 1)`: a count (of layers, heads, GPUs, ...).
    pub fn positive_int() -> Type {
        Type::int_at_least(1)
    }

    /// `int(>= min)`.
    pub fn int_at_least(min: i64) -> Type {
        Type::Int(vec![Bound {
            op: crate::syntax::ast::CmpOp::Ge,
            value: min as f64,
        }])
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bounds = |b: &[Bound]| {
            if b.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> = b.iter().map(|b| b.to_string()).collect();
                format!("({})", parts.join(", "))
            }
        };
        match self {
            Type::Int(b) => write!(f, "int{}", bounds(b)),
            Type::Float(b) => write!(f, "float{}", bounds(b)),
            Type::Bool => write!(f, "bool"),
            Type::Str => write!(f, "string"),
            Type::Tuple(items) => {
                let parts: Vec<String> = items.iter().map(|t| t.to_string()).collect();
                write!(f, "({})", parts.join(", "))
            }
            Type::Enum(names) => write!(f, "{}", names.join(" | ")),
            Type::Kind(k) => write!(f, "{k}"),
            Type::Optional(t) => write!(f, "{t}?"),
        }
    }
}

/// Whether a constructor of kind `made` may stand where `wanted` is expected: every
/// `mlp` is also an `ffn` (a dense feed-forward).
pub fn kind_fits(made: &str, wanted: &str) -> bool {
    made == wanted || (wanted == "ffn" && made == "mlp")
}
