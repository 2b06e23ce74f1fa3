//! Reading the fields of a block: unknown and duplicated field names, missing required
//! fields, and typed access to the values.

use std::collections::BTreeMap;

use super::errors;
use super::eval::Ctx;
use super::value::{Type, Value, V};
use super::Checker;
use crate::diag::did_you_mean;
use crate::syntax::ast::{self, BlockKind};

impl Checker<'_> {
    /// The fields of `block` by name, after reporting names not in `known` and names
    /// written twice.
    pub(crate) fn block_fields<'b>(
        &mut self,
        block: &'b ast::Block,
        known: &[&str],
    ) -> BTreeMap<String, &'b ast::Field> {
        let mut out: BTreeMap<String, &ast::Field> = BTreeMap::new();
        for f in &block.fields {
            if !known.contains(&f.name.name.as_str()) {
                // A line that did not parse was reported already.
                if matches!(f.value.kind, ast::ExprKind::Error) {
                    continue;
                }
                let help = did_you_mean(&f.name.name, known.iter().copied())
                    .or_else(|| self.parameter_home(&f.name.name));
                self.sink.push(errors::unknown_field(
                    f.name.span,
                    &f.name.name,
                    block.kind.as_str(),
                    help,
                    known,
                ));
                continue;
            }
            if let Some(prev) = out.get(&f.name.name) {
                // A line that did not parse was reported already.
                if matches!(f.value.kind, ast::ExprKind::Error) {
                    continue;
                }
                if matches!(prev.value.kind, ast::ExprKind::Error) {
                    out.insert(f.name.name.clone(), f);
                    continue;
                }
                self.sink.push(errors::duplicate_field(
                    f.name.span,
                    &f.name.name,
                    prev.name.span,
                ));
                continue;
            }
            out.insert(f.name.name.clone(), f);
        }
        if block.kind != BlockKind::Model {
            for l in &block.layers {
                self.sink
                    .push(errors::layers_outside_model(l.span, block.kind.as_str()));
            }
        }
        out
    }

    /// "`lr` is a parameter of `adamw(...)`": for a field name that belongs inside a
    /// constructor call.
    fn parameter_home(&self, name: &str) -> Option<String> {
        let owners: Vec<String> = self
            .modules
            .iter()
            .filter(|m| m.is_std)
            .flat_map(|m| m.items.values())
            .filter_map(|e| match &e.kind {
                super::scope::EntityKind::Ctor(sig) if sig.param(name).is_some() => {
                    Some(format!("`{}(...)`", sig.name))
                }
                _ => None,
            })
            .collect();
        match owners.as_slice() {
            [] => None,
            [one] => Some(format!("`{name}` is a parameter of {one}")),
            many => Some(format!("`{name}` is a parameter of {}", many.join(", "))),
        }
    }

    /// Evaluates field `name` of `fields` against `ty`; `None` if absent or wrong.
    pub(crate) fn typed_field(
        &mut self,
        fields: &BTreeMap<String, &ast::Field>,
        name: &str,
        ty: &Type,
        ctx: Ctx,
    ) -> Option<V> {
        let f = fields.get(name)?;
        let v = self.eval(&f.value, ctx);
        let v = self.conform(v, ty, &format!("field `{name}`"), ctx);
        if v.is_error() {
            None
        } else {
            Some(v)
        }
    }

    /// Like [`Self::typed_field`], noting a missing field in `missing` (its name and type)
    /// for one report of every missing field of the block ([`errors::missing_fields`]).
    pub(crate) fn field_noting_missing(
        &mut self,
        fields: &BTreeMap<String, &ast::Field>,
        name: &str,
        ty: &Type,
        ctx: Ctx,
        missing: &mut Vec<(String, String)>,
    ) -> Option<V> {
        if !fields.contains_key(name) {
            missing.push((name.to_string(), ty.to_string()));
            return None;
        }
        self.typed_field(fields, name, ty, ctx)
    }
}

pub fn int(v: &V) -> Option<i64> {
    match v.value {
        Value::Int(i) => Some(i),
        _ => None,
    }
}

pub fn uint(v: &V) -> u64 {
    int(v).map(|i| i.max(0) as u64).unwrap_or(0)
}

pub fn float(v: &V) -> f64 {
    match v.value {
        Value::Int(i) => i as f64,
        Value::Float(f) => f,
        _ => 0.0,
    }
}

pub fn boolean(v: &V) -> bool {
    matches!(v.value, Value::Bool(true))
}

pub fn string(v: &V) -> String {
    match &v.value {
        Value::Str(s) => s.clone(),
        _ => String::new(),
    }
}

pub fn symbol(v: &V) -> &str {
    match &v.value {
        Value::Symbol(s) => s,
        _ => "",
    }
}
