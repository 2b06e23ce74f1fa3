//! Evaluation of expressions: constants, arithmetic (exact integer division where an
//! integer comes out), tuples, calls of definitions and stdlib constructors (arguments
//! matched to the signature, defaults filled in, types and ranges checked), and the
//! lazily evaluated fields of a model block.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::errors;
use super::scope::{EntityKind, ModId};
use super::signature::Signature;
use super::value::{fmt_float, kind_fits, Bound, CtorArg, CtorValue, Fraction, Type, Value, V};
use super::Checker;
use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::syntax::ast::{self, BinOp, Expr, ExprKind};

/// Calls nest at most this deep (a definition calling itself would not stop).
const MAX_CALL_DEPTH: usize = 64;

/// Where an expression is evaluated: its module, the parameters of the definition it
/// is in, and the fields of the model block it is in.
#[derive(Clone, Copy)]
pub struct Ctx<'e> {
    pub module: ModId,
    pub locals: Option<&'e BTreeMap<String, V>>,
    pub fields: Option<&'e FieldEnv>,
}

impl<'e> Ctx<'e> {
    pub fn module(module: ModId) -> Self {
        Ctx {
            module,
            locals: None,
            fields: None,
        }
    }
}

/// The fields of a model block (its own and its presets'), evaluated on first use so
/// they may refer to each other in any order.
#[derive(Default)]
pub struct FieldEnv {
    /// Field name -> (its expression, the module it was written in).
    pub exprs: BTreeMap<String, (Expr, ModId)>,
    memo: RefCell<BTreeMap<String, V>>,
    active: RefCell<BTreeSet<String>>,
}

impl FieldEnv {
    pub fn new(exprs: BTreeMap<String, (Expr, ModId)>) -> Self {
        FieldEnv {
            exprs,
            ..Default::default()
        }
    }

    /// Marks a field whose value was reported wrong, so its uses stay quiet.
    pub fn poison(&self, name: &str, span: Span) {
        self.memo
            .borrow_mut()
            .insert(name.to_string(), V::error(span));
    }
}

/// The parameters a call's arguments are matched against, a definition's or a
/// constructor's: the callee's name, where it is declared, its parameters' names in order.
struct Params<'p> {
    callee: &'p str,
    declared: Span,
    names: Vec<&'p str>,
}

/// Where one argument of a call goes.
enum Placed {
    /// To the parameter at this index of the declaration.
    Param(usize),
    /// Nowhere: its keyword names no parameter (most likely the missing one, misspelled).
    Unknown(Diagnostic),
    /// Nowhere: a positional argument after a keyword one, or past the last parameter.
    Misplaced(Diagnostic),
}

impl Params<'_> {
    /// Where argument `i` (`a`) goes: by its keyword, else by its place while no keyword
    /// came before it (`seen_keyword`, which this notes). The one rule of how arguments
    /// meet parameters, for definitions and constructors alike (each wrote it out once).
    fn place(&self, i: usize, a: &ast::Arg, seen_keyword: &mut bool) -> Placed {
        match &a.name {
            Some(n) => {
                *seen_keyword = true;
                match self.names.iter().position(|p| *p == n.name) {
                    Some(k) => Placed::Param(k),
                    None => Placed::Unknown(errors::unknown_argument(
                        n.span,
                        &n.name,
                        self.callee,
                        did_you_mean(&n.name, self.names.iter().copied()),
                        self.declared,
                    )),
                }
            }
            None if *seen_keyword => Placed::Misplaced(errors::positional_after_keyword(a.span)),
            None if i < self.names.len() => Placed::Param(i),
            None => Placed::Misplaced(errors::too_many_arguments(
                a.span,
                self.callee,
                self.names.len(),
            )),
        }
    }
}

/// The written arguments of a constructor call, matched and conformed.
#[derive(Default)]
struct CtorArguments {
    /// By parameter name.
    given: BTreeMap<String, CtorArg>,
    /// An argument was misplaced, repeated or of the wrong type: the call is an error.
    failed: bool,
    /// A keyword named no parameter: the missing argument is not reported again.
    unknown_given: bool,
}

impl Checker<'_> {
    /// The value of field `name` of `env`, evaluated once.
    pub(crate) fn field_value(&mut self, env: &FieldEnv, name: &str, use_span: Span) -> Option<V> {
        if let Some(v) = env.memo.borrow().get(name) {
            return Some(v.clone());
        }
        let (expr, module) = env.exprs.get(name)?.clone();
        if !env.active.borrow_mut().insert(name.to_string()) {
            self.sink.push(errors::cyclic(use_span, name));
            return Some(V::error(use_span));
        }
        let ctx = Ctx {
            module,
            locals: None,
            fields: Some(env),
        };
        let v = self.eval(&expr, ctx);
        env.active.borrow_mut().remove(name);
        env.memo.borrow_mut().insert(name.to_string(), v.clone());
        Some(v)
    }

    /// The value of constant `name` of module `m`, evaluated once.
    pub(crate) fn const_value(&mut self, m: ModId, c: &ast::Const, use_span: Span) -> V {
        let key = (m, c.name.name.clone());
        if let Some(v) = self.const_memo.get(&key) {
            return v.clone();
        }
        if !self.const_active.insert(key.clone()) {
            self.sink.push(errors::cyclic(use_span, &c.name.name));
            return V::error(use_span);
        }
        let v = self.eval(&c.value, Ctx::module(m));
        self.const_active.remove(&key);
        self.const_memo.insert(key, v.clone());
        v
    }

    pub(crate) fn eval(&mut self, e: &Expr, ctx: Ctx) -> V {
        let span = e.span;
        let value = match &e.kind {
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(f) => Value::Float(*f),
            ExprKind::Str(s) => Value::Str(s.clone()),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::None => Value::None,
            ExprKind::Error => Value::Error,
            ExprKind::Name(n) => return self.eval_name(n, span, ctx),
            ExprKind::Tuple(items) => {
                Value::Tuple(items.iter().map(|i| self.eval(i, ctx)).collect())
            }
            ExprKind::Neg(inner) => {
                let v = self.eval(inner, ctx);
                let fraction = v.fraction;
                let value = match v.value {
                    Value::Int(i) => match i.checked_neg() {
                        Some(n) => Value::Int(n),
                        None => {
                            self.sink.push(errors::overflow(span));
                            Value::Error
                        }
                    },
                    Value::Float(f) => Value::Float(-f),
                    Value::Error => Value::Error,
                    ref other => {
                        let other = other.clone();
                        self.report_not_number(&V::new(other, v.span), ctx);
                        Value::Error
                    }
                };
                return V {
                    fraction,
                    ..V::new(value, span)
                };
            }
            ExprKind::Binary(op, a, b) => {
                let a = self.eval(a, ctx);
                let b = self.eval(b, ctx);
                return self.binary(*op, a, b, span, ctx);
            }
            ExprKind::Call { callee, args } => return self.call(callee, args, span, ctx),
            ExprKind::Batch { sequences, tokens } => Value::Batch(
                Box::new(self.eval(sequences, ctx)),
                Box::new(self.eval(tokens, ctx)),
            ),
            ExprKind::Of { count, hardware } => {
                Value::Of(Box::new(self.eval(count, ctx)), hardware.name.clone())
            }
            ExprKind::Across(group) => Value::Across(group.name.clone()),
        };
        V::new(value, span)
    }

    fn eval_name(&mut self, name: &str, span: Span, ctx: Ctx) -> V {
        if let Some(v) = ctx.locals.and_then(|l| l.get(name)) {
            return v.clone().at(span);
        }
        if let Some(env) = ctx.fields {
            if env.exprs.contains_key(name) {
                if let Some(v) = self.field_value(env, name, span) {
                    return v.at(span);
                }
            }
        }
        match self.lookup(ctx.module, name) {
            Some(r) => match r.kind {
                EntityKind::Const(c) => {
                    let v = self.const_value(r.module, &c, span);
                    v.at(span)
                }
                EntityKind::Ctor(sig) => {
                    self.sink
                        .push(errors::constructor_not_called(span, &sig.name));
                    V::error(span)
                }
                EntityKind::Def(d) => {
                    self.sink.push(errors::def_not_called(span, &d.name.name));
                    V::error(span)
                }
                kind => {
                    self.sink
                        .push(errors::not_a_value(span, name, kind.describe()));
                    V::error(span)
                }
            },
            None => V::new(Value::Symbol(name.to_string()), span),
        }
    }

    /// Reports a bare name that is not defined anywhere (an unknown name), with the
    /// stdlib module to import it from or the closest visible name.
    pub(crate) fn report_unknown_name(&mut self, name: &str, span: Span, ctx: Ctx, extra: &[&str]) {
        let help = self.not_found_help(name, |this| {
            let mut names = this.visible_names(ctx.module);
            if let Some(l) = ctx.locals {
                names.extend(l.keys().cloned());
            }
            if let Some(f) = ctx.fields {
                names.extend(f.exprs.keys().cloned());
            }
            names.extend(extra.iter().map(|s| s.to_string()));
            names
        });
        self.sink.push(errors::unknown_name(span, name, help));
    }

    fn report_not_number(&mut self, v: &V, ctx: Ctx) {
        match &v.value {
            Value::Symbol(s) => {
                let s = s.clone();
                self.report_unknown_name(&s, v.span, ctx, &[]);
            }
            Value::Error => {}
            other => self
                .sink
                .push(errors::not_a_number(v.span, &other.describe())),
        }
    }

    fn binary(&mut self, op: BinOp, a: V, b: V, span: Span, ctx: Ctx) -> V {
        use Value::*;
        if a.is_error() || b.is_error() {
            return V::error(span);
        }
        match (&a.value, &b.value) {
            (Int(x), Int(y)) => self.int_binary(op, *x, *y, span, b.span),
            (Int(_) | Float(_), Int(_) | Float(_)) => self.float_binary(op, &a, &b, span),
            (Str(x), Str(y)) if op == BinOp::Add => V::new(Str(format!("{x}{y}")), span),
            _ => {
                self.report_bad_operands(op, &a, &b, span, ctx);
                V::error(span)
            }
        }
    }

    /// Whether `op` divides by a zero `divisor` (reported at the divisor).
    fn divides_by_zero(&mut self, op: BinOp, divisor_is_zero: bool, divisor: Span) -> bool {
        let by_zero = matches!(op, BinOp::Div | BinOp::Rem) && divisor_is_zero;
        if by_zero {
            self.sink.push(errors::division_by_zero(divisor));
        }
        by_zero
    }

    /// Integer arithmetic, checked for overflow; a division with a remainder is a float.
    fn int_binary(&mut self, op: BinOp, x: i64, y: i64, span: Span, divisor: Span) -> V {
        if self.divides_by_zero(op, y == 0, divisor) {
            return V::error(span);
        }
        let r = match op {
            BinOp::Add => x.checked_add(y),
            BinOp::Sub => x.checked_sub(y),
            BinOp::Mul => x.checked_mul(y),
            BinOp::Rem => x.checked_rem_euclid(y),
            // `checked_rem`: the one quotient that overflows (i64::MIN / -1) is reported below
            BinOp::Div if x.checked_rem(y).is_some_and(|r| r != 0) => {
                return V {
                    fraction: Fraction::Divided,
                    ..V::new(Value::Float(x as f64 / y as f64), span)
                };
            }
            BinOp::Div => x.checked_div(y),
        };
        match r {
            Some(v) => V::new(Value::Int(v), span),
            None => {
                self.sink.push(errors::overflow(span));
                V::error(span)
            }
        }
    }

    /// Arithmetic with a float operand; the result keeps whether a division made it.
    fn float_binary(&mut self, op: BinOp, a: &V, b: &V, span: Span) -> V {
        let x = as_f64(&a.value);
        let y = as_f64(&b.value);
        if self.divides_by_zero(op, y == 0.0, b.span) {
            return V::error(span);
        }
        let r = match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
            BinOp::Rem => x.rem_euclid(y),
        };
        if !r.is_finite() {
            self.sink.push(errors::overflow(span));
            return V::error(span);
        }
        let divided =
            op == BinOp::Div || a.fraction == Fraction::Divided || b.fraction == Fraction::Divided;
        V {
            fraction: if divided {
                Fraction::Divided
            } else {
                Fraction::Computed
            },
            ..V::new(Value::Float(r), span)
        }
    }

    /// Operands `op` does not take: a symbol where a number belongs, or two values of the
    /// wrong kinds.
    fn report_bad_operands(&mut self, op: BinOp, a: &V, b: &V, span: Span, ctx: Ctx) {
        let bad = if matches!(a.value, Value::Int(_) | Value::Float(_)) {
            b
        } else {
            a
        };
        if matches!(bad.value, Value::Symbol(_)) {
            self.report_not_number(bad, ctx);
        } else {
            self.sink.push(errors::bad_operands(
                span,
                op.as_str(),
                &a.value.describe(),
                &b.value.describe(),
            ));
        }
    }

    fn call(&mut self, callee: &ast::Ident, args: &[ast::Arg], span: Span, ctx: Ctx) -> V {
        if self.call_depth >= MAX_CALL_DEPTH {
            self.sink.push(errors::too_deep(span, &callee.name));
            return V::error(span);
        }
        let resolved = self.lookup(ctx.module, &callee.name);
        match resolved.map(|r| (r.module, r.kind)) {
            Some((_, EntityKind::Ctor(sig))) => {
                self.call_depth += 1;
                let v = self.call_ctor(&sig, callee.span, args, span, ctx);
                self.call_depth -= 1;
                v
            }
            Some((m, EntityKind::Def(def))) => {
                self.call_depth += 1;
                let v = self.call_def(&def, m, args, span, ctx);
                self.call_depth -= 1;
                v
            }
            Some((_, kind)) => {
                self.sink.push(errors::not_callable(
                    callee.span,
                    &callee.name,
                    kind.describe(),
                ));
                V::error(span)
            }
            None => match callee.name.as_str() {
                "floor" | "ceil" => self.call_rounding(&callee.name, args, span, ctx),
                _ => self.call_unknown(callee, args, span, ctx),
            },
        }
    }

    /// A call of a name nothing defines: its arguments are still evaluated, so that their
    /// own mistakes are reported, then the name is, with the stdlib module that has it or
    /// the closest callable name.
    fn call_unknown(&mut self, callee: &ast::Ident, args: &[ast::Arg], span: Span, ctx: Ctx) -> V {
        let help = self.not_found_help(&callee.name, |this| {
            let mut names = this.visible_names(ctx.module);
            names.extend(["floor".to_string(), "ceil".to_string()]);
            names
        });
        for a in args {
            self.eval(&a.value, ctx);
        }
        self.sink
            .push(errors::unknown_function(callee.span, &callee.name, help));
        V::error(span)
    }

    /// `floor(x)` and `ceil(x)`: the integer division the grammar leaves to `/`.
    fn call_rounding(&mut self, name: &str, args: &[ast::Arg], span: Span, ctx: Ctx) -> V {
        if args.len() != 1 || args[0].name.is_some() {
            self.sink.push(errors::rounding_arity(span, name));
            return V::error(span);
        }
        let v = self.eval(&args[0].value, ctx);
        let x = match v.value {
            Value::Int(i) => return V::new(Value::Int(i), span),
            Value::Float(f) => f,
            Value::Error => return V::error(span),
            _ => {
                self.report_not_number(&v, ctx);
                return V::error(span);
            }
        };
        let r = if name == "floor" { x.floor() } else { x.ceil() };
        if r.abs() < 9.0e15 {
            V::new(Value::Int(r as i64), span)
        } else {
            self.sink.push(errors::overflow(span));
            V::error(span)
        }
    }

    /// A call of a user's definition, in its phases: the arguments bound to parameters,
    /// the defaults of the rest, then the body evaluated with them. A missing argument
    /// stops it there (the body would only report the same name as unknown).
    fn call_def(
        &mut self,
        def: &Rc<ast::Def>,
        m: ModId,
        args: &[ast::Arg],
        span: Span,
        ctx: Ctx,
    ) -> V {
        let mut bound = self.bind_def_arguments(def, args, ctx);
        let missing = self.def_defaults(def, m, &mut bound);
        if !missing.is_empty() {
            self.sink.push(errors::missing_arguments(
                span,
                &def.name.name,
                &missing,
                Some(def.name.span),
            ));
            return V::error(span);
        }
        let inner = Ctx {
            module: m,
            locals: Some(&bound),
            fields: ctx.fields,
        };
        let v = self.eval(&def.body, inner);
        // The result points at the call: that is the user's text for this use.
        v.at(span)
    }

    /// The written arguments of a definition's call by parameter name, each evaluated in
    /// the caller's context (a misplaced or repeated one too, before it is reported and
    /// left out).
    fn bind_def_arguments(
        &mut self,
        def: &ast::Def,
        args: &[ast::Arg],
        ctx: Ctx,
    ) -> BTreeMap<String, V> {
        let params = Params {
            callee: &def.name.name,
            declared: def.name.span,
            names: def.params.iter().map(|p| p.name.name.as_str()).collect(),
        };
        let mut bound: BTreeMap<String, V> = BTreeMap::new();
        let mut seen_keyword = false;
        for (i, a) in args.iter().enumerate() {
            let v = self.eval(&a.value, ctx);
            let name = match params.place(i, a, &mut seen_keyword) {
                Placed::Param(k) => def.params[k].name.name.clone(),
                Placed::Unknown(d) | Placed::Misplaced(d) => {
                    self.sink.push(d);
                    continue;
                }
            };
            if bound.contains_key(&name) {
                self.sink.push(errors::argument_twice(a.span, &name));
                continue;
            }
            bound.insert(name, v);
        }
        bound
    }

    /// Binds the defaults (evaluated in the definition's module `m`) of the parameters the
    /// call left out; returns the names of those without one, in declaration order.
    fn def_defaults(
        &mut self,
        def: &ast::Def,
        m: ModId,
        bound: &mut BTreeMap<String, V>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        for p in &def.params {
            if bound.contains_key(&p.name.name) {
                continue;
            }
            match &p.default {
                Some(d) => {
                    let v = self.eval(d, Ctx::module(m));
                    bound.insert(p.name.name.clone(), v);
                }
                None => missing.push(p.name.name.clone()),
            }
        }
        missing
    }

    /// A call of a stdlib constructor, in its phases: the written arguments matched to the
    /// signature and conformed to their types, the defaults of the rest, then the value with
    /// every parameter filled in. Any mistake makes the call an error value, once every
    /// argument was looked at.
    pub(crate) fn call_ctor(
        &mut self,
        sig: &Rc<Signature>,
        callee_span: Span,
        args: &[ast::Arg],
        span: Span,
        ctx: Ctx,
    ) -> V {
        let CtorArguments {
            mut given,
            mut failed,
            unknown_given,
        } = self.ctor_arguments(sig, args, ctx);
        let missing = self.ctor_defaults(sig, span, &mut given);
        if !missing.is_empty() {
            // A misspelled argument usually is the missing one: it was reported already.
            if !unknown_given {
                self.sink.push(
                    errors::missing_arguments(span, &sig.name, &missing, None)
                        .with_help(format!("the signature is `{}`", sig.display())),
                );
            }
            failed = true;
        }
        if failed {
            return V::error(span);
        }
        V::new(
            Value::Ctor(Rc::new(CtorValue {
                name: sig.name.clone(),
                kind: sig.kind.clone(),
                args: given,
                span,
                callee_span,
            })),
            span,
        )
    }

    /// The written arguments of a constructor call, each matched to its parameter and
    /// conformed to the parameter's type. A misplaced or unknown argument is reported and
    /// still evaluated, for its own mistakes; a repeated one is reported and not.
    fn ctor_arguments(&mut self, sig: &Signature, args: &[ast::Arg], ctx: Ctx) -> CtorArguments {
        let params = Params {
            callee: &sig.name,
            declared: sig.name_span,
            names: sig.params.iter().map(|p| p.name.as_str()).collect(),
        };
        let mut out = CtorArguments::default();
        let mut seen_keyword = false;
        for (i, a) in args.iter().enumerate() {
            let param = match params.place(i, a, &mut seen_keyword) {
                Placed::Param(k) => &sig.params[k],
                Placed::Unknown(d) => {
                    self.sink.push(d);
                    // Reported and left out: the call is still made from the other
                    // arguments, so that the rules about it run in this pass.
                    self.eval(&a.value, ctx);
                    out.unknown_given = true;
                    continue;
                }
                Placed::Misplaced(d) => {
                    self.sink.push(d);
                    self.eval(&a.value, ctx);
                    out.failed = true;
                    continue;
                }
            };
            if let Some(prev) = out.given.get(&param.name) {
                self.sink.push(
                    errors::argument_twice(a.span, &param.name)
                        .with_secondary(prev.value.span, "first given here"),
                );
                out.failed = true;
                continue;
            }
            let v = self.eval(&a.value, ctx);
            let what = format!("`{}` of `{}`", param.name, sig.name);
            let v = self.conform(v, &param.ty, &what, ctx);
            out.failed |= v.is_error();
            out.given.insert(
                param.name.clone(),
                CtorArg {
                    value: v,
                    explicit: true,
                },
            );
        }
        out
    }

    /// Fills in the parameters a constructor call left out: a default (evaluated and
    /// conformed in the signature's module), `none` for an optional one without a default.
    /// Returns the names of those with neither, in declaration order.
    fn ctor_defaults(
        &mut self,
        sig: &Signature,
        span: Span,
        given: &mut BTreeMap<String, CtorArg>,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        for p in &sig.params {
            if given.contains_key(&p.name) {
                continue;
            }
            let v = match (&p.default, &p.ty) {
                (Some(d), _) => {
                    let dctx = Ctx::module(sig.module);
                    let v = self.eval(d, dctx);
                    let what = format!("default of `{}` of `{}`", p.name, sig.name);
                    self.conform(v, &p.ty, &what, dctx)
                }
                (None, Type::Optional(_)) => V::new(Value::None, span),
                (None, _) => {
                    missing.push(p.name.clone());
                    continue;
                }
            };
            given.insert(
                p.name.clone(),
                CtorArg {
                    value: v,
                    explicit: false,
                },
            );
        }
        missing
    }

    /// Checks `v` against `ty`, converting ints to floats where a float is wanted and
    /// integral floats to ints where an int is wanted. `what` names the slot in messages
    /// ("`hidden` of `mlp`", "field `width`"). Reports and returns an error value on a
    /// mismatch.
    ///
    /// A bare name is judged first (a variant of the enum wanted, or an unknown name), then
    /// the value by the type: each type's rule is a phase of its own.
    pub(crate) fn conform(&mut self, v: V, ty: &Type, what: &str, ctx: Ctx) -> V {
        if v.is_error() {
            return v;
        }
        if let Value::Symbol(s) = &v.value {
            let s = s.clone();
            return self.conform_name(v, &s, ty, what, ctx);
        }
        match ty {
            Type::Optional(inner) => {
                if matches!(v.value, Value::None) {
                    v
                } else {
                    self.conform(v, inner, what, ctx)
                }
            }
            Type::Int(bounds) => self.conform_int(v, ty, bounds, what),
            Type::Float(bounds) => self.conform_float(v, ty, bounds, what),
            Type::Bool => match v.value {
                Value::Bool(_) => v,
                _ => self.mismatch(v, what, &ty.to_string()),
            },
            Type::Str => match v.value {
                Value::Str(_) => v,
                _ => self.mismatch(v, what, &ty.to_string()),
            },
            Type::Enum(variants) => {
                let expected = format!("one of {}", variants.join(", "));
                self.mismatch(v, what, &expected)
            }
            Type::Tuple(types) => self.conform_tuple(v, ty, types, what, ctx),
            Type::Kind(k) => match &v.value {
                Value::Ctor(c) if kind_fits(&c.kind, k) => v,
                other => {
                    let d = other.describe();
                    let help = self.kind_examples(k);
                    self.sink
                        .push(errors::wrong_kind(v.span, what, k, &d, help));
                    V::error(v.span)
                }
            },
        }
    }

    /// A bare name `s` where `ty` is wanted: a variant of the enum `ty` is (or makes
    /// optional) passes; another name is a wrong variant there, and an unknown name
    /// anywhere else.
    fn conform_name(&mut self, v: V, s: &str, ty: &Type, what: &str, ctx: Ctx) -> V {
        let span = v.span;
        let variants: Vec<String> = match ty {
            Type::Enum(vs) => vs.clone(),
            Type::Optional(inner) => match inner.as_ref() {
                Type::Enum(vs) => vs.clone(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        if variants.iter().any(|x| x == s) {
            return v;
        }
        if !variants.is_empty() {
            let help = did_you_mean(s, variants.iter().map(String::as_str));
            self.sink
                .push(errors::not_a_variant(span, s, what, &variants, help));
            return V::error(span);
        }
        self.report_unknown_name(s, span, ctx, &[]);
        V::error(span)
    }

    /// An int where `ty` (an int type with `bounds`) is wanted: an integral float becomes
    /// one; the value must hold every bound.
    fn conform_int(&mut self, v: V, ty: &Type, bounds: &[Bound], what: &str) -> V {
        let span = v.span;
        let i = match v.value {
            Value::Int(i) => i,
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
            Value::Float(f) => {
                self.sink
                    .push(errors::not_an_integer(span, what, f, v.fraction));
                return V::error(span);
            }
            _ => return self.mismatch(v, what, &ty.to_string()),
        };
        if !self.within_bounds(bounds, i as f64, || i.to_string(), span, what) {
            return V::error(span);
        }
        V::new(Value::Int(i), span)
    }

    /// A float where `ty` (a float type with `bounds`) is wanted: an int becomes one; the
    /// value must hold every bound.
    fn conform_float(&mut self, v: V, ty: &Type, bounds: &[Bound], what: &str) -> V {
        let span = v.span;
        let f = match v.value {
            Value::Int(i) => i as f64,
            Value::Float(f) => f,
            _ => return self.mismatch(v, what, &ty.to_string()),
        };
        if !self.within_bounds(bounds, f, || fmt_float(f), span, what) {
            return V::error(span);
        }
        V::new(Value::Float(f), span)
    }

    /// Whether `x` holds every one of `bounds`; the first it breaks is reported, the value
    /// shown as `shown` gives it (as written: `3`, not `3.0`, for an int).
    fn within_bounds(
        &mut self,
        bounds: &[Bound],
        x: f64,
        shown: impl FnOnce() -> String,
        span: Span,
        what: &str,
    ) -> bool {
        match bounds.iter().find(|b| !b.holds(x)) {
            Some(b) => {
                self.sink
                    .push(errors::out_of_range(span, what, &shown(), &b.to_string()));
                false
            }
            None => true,
        }
    }

    /// A tuple where the tuple type `ty` (of `types`) is wanted: as many items, each
    /// conformed to its type (every item's mistake reported, not only the first).
    fn conform_tuple(&mut self, v: V, ty: &Type, types: &[Type], what: &str, ctx: Ctx) -> V {
        let span = v.span;
        let items = match v.value {
            Value::Tuple(items) if items.len() == types.len() => items,
            _ => return self.mismatch(v, what, &ty.to_string()),
        };
        let mut out = Vec::new();
        let mut bad = false;
        for (item, t) in items.into_iter().zip(types) {
            let c = self.conform(item, t, what, ctx);
            bad |= c.is_error();
            out.push(c);
        }
        if bad {
            V::error(span)
        } else {
            V::new(Value::Tuple(out), span)
        }
    }

    /// Reports `v` as not the `expected` type of slot `what`: the one wording of every type
    /// mismatch `conform` finds.
    fn mismatch(&mut self, v: V, what: &str, expected: &str) -> V {
        self.sink.push(errors::type_mismatch(
            v.span,
            what,
            expected,
            &v.value.describe(),
        ));
        V::error(v.span)
    }

    /// "a `gate` is made by `naive(...)`, `gshard(...)`, ...": the stdlib constructors
    /// of a kind, for help lines.
    fn kind_examples(&self, kind: &str) -> Option<String> {
        let mut names: Vec<String> = Vec::new();
        for m in self.modules.iter().filter(|m| m.is_std) {
            for (name, e) in &m.items {
                if let EntityKind::Ctor(sig) = &e.kind {
                    if kind_fits(&sig.kind, kind) {
                        names.push(format!("`{name}(...)`"));
                    }
                }
            }
        }
        if names.is_empty() {
            None
        } else {
            Some(format!("a `{kind}` is made by {}", names.join(", ")))
        }
    }
}

pub fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Int(i) => *i as f64,
        Value::Float(f) => *f,
        _ => f64::NAN,
    }
}
