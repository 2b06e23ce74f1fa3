//! Constructor signatures: a stdlib `constructor kind name(param: type = default, ...)`
//! declaration turned into the parameter list calls are checked against.

use super::errors;
use super::scope::ModId;
use super::value::{Bound, Type};
use super::Checker;
use crate::diag::Span;
use crate::syntax::ast::{self, ExprKind, TypeExpr};

/// The kinds a constructor may make, and so the kinds a parameter may name.
pub const KINDS: &[&str] = &[
    "gate",
    "mlp",
    "ffn",
    "shared",
    "block",
    "attention",
    "data",
    "tokenizer",
    "init",
    "optimizer",
    "schedule",
    "every",
    "expert_group",
    "smart_schedule",
];

#[derive(Clone, Debug)]
pub struct ParamSig {
    pub name: String,
    pub ty: Type,
    pub default: Option<ast::Expr>,
    pub doc: Vec<String>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Signature {
    pub name: String,
    pub kind: String,
    pub doc: Vec<String>,
    pub params: Vec<ParamSig>,
    /// The module the declaration is in: defaults are evaluated there.
    pub module: ModId,
    pub span: Span,
    /// The constructor's name in its declaration.
    pub name_span: Span,
}

impl Signature {
    pub fn param(&self, name: &str) -> Option<&ParamSig> {
        self.params.iter().find(|p| p.name == name)
    }

    /// `mlp(hidden: int(>= 1), act: gelu | relu | swiglu = gelu)`, for help lines.
    pub fn display(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| match &p.default {
                Some(_) => format!("{}: {} = ...", p.name, p.ty),
                None => format!("{}: {}", p.name, p.ty),
            })
            .collect();
        format!("{}({})", self.name, params.join(", "))
    }
}

impl Checker<'_> {
    pub(crate) fn signature(&mut self, decl: &ast::BuiltinDecl, module: ModId) -> Signature {
        if !KINDS.contains(&decl.kind.name.as_str()) {
            self.sink
                .push(errors::unknown_kind(decl.kind.span, &decl.kind.name, KINDS));
        }
        let mut params: Vec<ParamSig> = Vec::new();
        for p in &decl.params {
            if params.iter().any(|q| q.name == p.name.name) {
                self.sink
                    .push(errors::duplicate_param(p.name.span, &p.name.name));
                continue;
            }
            let ty = self.type_expr(&p.ty);
            params.push(ParamSig {
                name: p.name.name.clone(),
                ty,
                default: p.default.clone(),
                doc: p.doc.clone(),
                span: p.span,
            });
        }
        Signature {
            name: decl.name.name.clone(),
            kind: decl.kind.name.clone(),
            doc: decl.doc.clone(),
            params,
            module,
            span: decl.span,
            name_span: decl.name.span,
        }
    }

    fn type_expr(&mut self, t: &TypeExpr) -> Type {
        match t {
            TypeExpr::Tuple(items, _) => {
                Type::Tuple(items.iter().map(|t| self.type_expr(t)).collect())
            }
            TypeExpr::Enum(names, _) => Type::Enum(names.iter().map(|n| n.name.clone()).collect()),
            TypeExpr::Named {
                name,
                constraints,
                optional,
                ..
            } => {
                let mut bounds = Vec::new();
                for (op, e) in constraints {
                    match literal_number(e) {
                        Some(value) => bounds.push(Bound { op: *op, value }),
                        None => self.sink.push(errors::bound_not_literal(e.span)),
                    }
                }
                let numeric = matches!(name.name.as_str(), "int" | "float");
                if !bounds.is_empty() && !numeric {
                    self.sink
                        .push(errors::bound_on_non_number(name.span, &name.name));
                }
                let ty = match name.name.as_str() {
                    "int" => Type::Int(bounds),
                    "float" => Type::Float(bounds),
                    "bool" => Type::Bool,
                    "string" => Type::Str,
                    k if KINDS.contains(&k) => Type::Kind(k.to_string()),
                    other => {
                        let mut all = vec!["int", "float", "bool", "string"];
                        all.extend(KINDS);
                        self.sink.push(errors::unknown_type(name.span, other, &all));
                        Type::Kind(other.to_string())
                    }
                };
                if *optional {
                    Type::Optional(Box::new(ty))
                } else {
                    ty
                }
            }
        }
    }
}

/// A bound must be a plain (possibly negated) number.
fn literal_number(e: &ast::Expr) -> Option<f64> {
    match &e.kind {
        ExprKind::Int(i) => Some(*i as f64),
        ExprKind::Float(f) => Some(*f),
        ExprKind::Neg(inner) => literal_number(inner).map(|v| -v),
        _ => None,
    }
}
