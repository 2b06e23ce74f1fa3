//! The syntax tree of one `.fmoe` file. Every node keeps the [`Span`] of the text it came
//! from; nothing here knows what a name means (that is `check`'s job).

use crate::diag::Span;

/// A name as written, with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// One parsed file: its items in source order. Syntax errors were reported while
/// parsing; the items that did parse are kept so checking can go on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Use(Use),
    Const(Const),
    Def(Def),
    Builtin(BuiltinDecl),
    Block(Block),
}

/// `use std.gates.gshard` or `use std.gates.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct Use {
    pub path: Vec<Ident>,
    pub glob: bool,
    pub span: Span,
}

/// `const name = expr`.
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    pub doc: Vec<String>,
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `def name(a, b = 2) = expr`: a parameterised expression, expanded at each call.
#[derive(Clone, Debug, PartialEq)]
pub struct Def {
    pub doc: Vec<String>,
    pub name: Ident,
    pub params: Vec<DefParam>,
    pub body: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DefParam {
    pub name: Ident,
    pub default: Option<Expr>,
}

/// `constructor gate gshard(capacity: (float(> 0), float(> 0)) = (1.2, 2.4), ...)`: the
/// signature of a constructor the compiler implements (stdlib only).
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltinDecl {
    pub doc: Vec<String>,
    /// What the constructor makes (`gate`, `mlp`, `ffn`, `data`, ...).
    pub kind: Ident,
    pub name: Ident,
    pub params: Vec<Param>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub doc: Vec<String>,
    pub name: Ident,
    pub ty: TypeExpr,
    pub default: Option<Expr>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TypeExpr {
    /// `int`, `float(> 0)`, `string?`, `gate`.
    Named {
        name: Ident,
        constraints: Vec<(CmpOp, Expr)>,
        optional: bool,
        span: Span,
    },
    /// `(float, float)`.
    Tuple(Vec<TypeExpr>, Span),
    /// `gelu | relu | swiglu`.
    Enum(Vec<Ident>, Span),
}

impl TypeExpr {
    pub fn span(&self) -> Span {
        match self {
            TypeExpr::Named { span, .. } | TypeExpr::Tuple(_, span) | TypeExpr::Enum(_, span) => {
                *span
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Model,
    Hardware,
    Megatron,
    Parallel,
    Train,
}

impl BlockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Model => "model",
            BlockKind::Hardware => "hardware",
            BlockKind::Megatron => "megatron",
            BlockKind::Parallel => "parallel",
            BlockKind::Train => "train",
        }
    }
}

/// `model name : parent { ... }`, `hardware name { ... }`, `parallel { ... }`, ...
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub doc: Vec<String>,
    pub kind: BlockKind,
    pub kw_span: Span,
    pub name: Option<Ident>,
    pub parent: Option<Ident>,
    pub fields: Vec<Field>,
    pub layers: Vec<LayerAssign>,
    pub span: Span,
}

/// `name = value` inside a block.
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub doc: Vec<String>,
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `override layers[1..depth step 2].ffn = value`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerAssign {
    pub override_span: Option<Span>,
    pub selection: Vec<SelItem>,
    pub selection_span: Span,
    pub field: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SelItem {
    Index(Expr),
    /// `start..end` (end excluded), optionally `step n`.
    Range {
        start: Box<Expr>,
        end: Box<Expr>,
        step: Option<Box<Expr>>,
        span: Span,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    pub fn as_str(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
    Name(String),
    Tuple(Vec<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    /// `32 x 1024 tokens`: sequences per batch times tokens per sequence.
    Batch {
        sequences: Box<Expr>,
        tokens: Box<Expr>,
    },
    /// `16 of h100_sxm`: a GPU count and a hardware profile.
    Of {
        count: Box<Expr>,
        hardware: Ident,
    },
    /// `across data`.
    Across(Ident),
    /// Text that did not parse; already reported.
    Error,
}

/// A call argument, positional or `name = value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}
