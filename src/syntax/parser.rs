//! Lowering from pest pairs to the AST, one function per construct, and turning pest's
//! errors into [`Diagnostic`]s that say what was expected in words a user knows.
//!
//! The grammar never fails on a whole file: each item that does not parse becomes a
//! junk region, which is parsed again with the strict rule to find the exact position
//! and the tokens that would have been accepted there.

use pest::iterators::Pair;
use pest::Parser as _;

use super::ast::*;
use super::errors;
use crate::diag::{FileId, Sink, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/fmoe.pest"]
struct FmoeParser;

/// Parses `text` (file `file`) into a [`File`]; every syntax error goes to `sink`.
pub fn parse(text: &str, file: FileId, sink: &mut Sink) -> File {
    if let Some(at) = too_deep(text) {
        sink.push(errors::nested_too_deeply(
            Span::new(file, at, at + 1),
            MAX_NESTING,
        ));
        return File::default();
    }
    for at in floor_division_lookalikes(text) {
        sink.push(errors::comment_looks_like_division(Span::new(
            file,
            at,
            at + 2,
        )));
    }
    let mut lower = Lower {
        file,
        source_len: text.len(),
        inside_unclosed_block: false,
        offset: 0,
        sink,
    };
    match FmoeParser::parse(Rule::file, text) {
        Ok(mut pairs) => match pairs.next() {
            Some(p) => lower.file(p),
            None => File::default(),
        },
        // The catch-all rules make this unreachable for any text; report rather than panic.
        Err(e) => {
            lower.report_pest_error(&e, 0, text, true);
            File::default()
        }
    }
}

struct Lower<'s> {
    file: FileId,
    /// Length of the whole file, to tell the end of a line from the end of the file.
    source_len: usize,
    /// After an unclosed `{`, the rest of the file is inside that block: its lines are
    /// not reported again one by one.
    inside_unclosed_block: bool,
    offset: usize,
    sink: &'s mut Sink,
}

impl Lower<'_> {
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, self.offset + s.start(), self.offset + s.end())
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident {
            span: self.span(&p),
            name: p.as_str().to_string(),
        }
    }

    fn file(&mut self, p: Pair<Rule>) -> File {
        let mut items = Vec::new();
        for item in p.into_inner() {
            match item.as_rule() {
                Rule::use_decl => items.push(Item::Use(self.use_decl(item))),
                Rule::const_decl => items.push(Item::Const(self.const_decl(item))),
                Rule::def_decl => items.push(Item::Def(self.def_decl(item))),
                Rule::builtin_decl => items.push(Item::Builtin(self.builtin_decl(item))),
                Rule::named_block | Rule::anon_block => items.push(Item::Block(self.block(item))),
                Rule::junk_top => {
                    if let Some(c) = self.junk_top(item) {
                        items.push(Item::Const(c));
                    }
                }
                _ => {}
            }
        }
        File { items }
    }

    fn docs(&self, p: Pair<Rule>) -> Vec<String> {
        p.into_inner()
            .filter_map(|d| d.into_inner().next())
            .map(|t| t.as_str().trim().to_string())
            .collect()
    }

    fn use_decl(&mut self, p: Pair<Rule>) -> Use {
        let span = self.span(&p);
        let mut path = Vec::new();
        let mut glob = false;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::path_seg => path.push(self.ident(c)),
                Rule::use_glob => glob = true,
                _ => {}
            }
        }
        Use { path, glob, span }
    }

    fn const_decl(&mut self, p: Pair<Rule>) -> Const {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut name = None;
        let mut value = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::ident => name = Some(self.ident(c)),
                Rule::expr => value = Some(self.expr(c)),
                _ => {}
            }
        }
        Const {
            doc,
            name: name.unwrap_or_else(|| self.missing_ident(span)),
            value: value.unwrap_or_else(|| self.error_expr(span)),
            span,
        }
    }

    fn def_decl(&mut self, p: Pair<Rule>) -> Def {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut name = None;
        let mut params = Vec::new();
        let mut body = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::ident => name = Some(self.ident(c)),
                Rule::def_param => params.push(self.def_param(c)),
                Rule::expr => body = Some(self.expr(c)),
                _ => {}
            }
        }
        Def {
            doc,
            name: name.unwrap_or_else(|| self.missing_ident(span)),
            params,
            body: body.unwrap_or_else(|| self.error_expr(span)),
            span,
        }
    }

    fn def_param(&mut self, p: Pair<Rule>) -> DefParam {
        let span = self.span(&p);
        let mut name = None;
        let mut default = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::ident => name = Some(self.ident(c)),
                Rule::expr => default = Some(self.expr(c)),
                _ => {}
            }
        }
        DefParam {
            name: name.unwrap_or_else(|| self.missing_ident(span)),
            default,
        }
    }

    fn builtin_decl(&mut self, p: Pair<Rule>) -> BuiltinDecl {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut idents = Vec::new();
        let mut params = Vec::new();
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::ident => idents.push(self.ident(c)),
                Rule::param => params.push(self.param(c)),
                _ => {}
            }
        }
        let mut idents = idents.into_iter();
        let kind = idents.next().unwrap_or_else(|| self.missing_ident(span));
        let name = idents.next().unwrap_or_else(|| self.missing_ident(span));
        BuiltinDecl {
            doc,
            kind,
            name,
            params,
            span,
        }
    }

    fn param(&mut self, p: Pair<Rule>) -> Param {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut name = None;
        let mut ty = None;
        let mut default = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::ident => name = Some(self.ident(c)),
                Rule::ty => ty = Some(self.ty(c)),
                Rule::expr => default = Some(self.expr(c)),
                _ => {}
            }
        }
        let name = name.unwrap_or_else(|| self.missing_ident(span));
        let ty = ty.unwrap_or_else(|| TypeExpr::Enum(Vec::new(), span));
        Param {
            doc,
            name,
            ty,
            default,
            span,
        }
    }

    fn ty(&mut self, p: Pair<Rule>) -> TypeExpr {
        let span = self.span(&p);
        let Some(inner) = p.into_inner().next() else {
            return TypeExpr::Enum(Vec::new(), span);
        };
        match inner.as_rule() {
            Rule::ty_tuple => {
                TypeExpr::Tuple(inner.into_inner().map(|t| self.ty(t)).collect(), span)
            }
            Rule::ty_enum => {
                TypeExpr::Enum(inner.into_inner().map(|t| self.ident(t)).collect(), span)
            }
            _ => {
                let mut name = None;
                let mut constraints = Vec::new();
                let mut optional = false;
                for c in inner.into_inner() {
                    match c.as_rule() {
                        Rule::ident => name = Some(self.ident(c)),
                        Rule::optional_mark => optional = true,
                        Rule::constraint => {
                            let mut op = CmpOp::Ge;
                            let mut bound = None;
                            for k in c.into_inner() {
                                match k.as_rule() {
                                    Rule::cmp_op => {
                                        op = match k.as_str() {
                                            ">" => CmpOp::Gt,
                                            "<" => CmpOp::Lt,
                                            "<=" => CmpOp::Le,
                                            _ => CmpOp::Ge,
                                        }
                                    }
                                    Rule::expr => bound = Some(self.expr(k)),
                                    _ => {}
                                }
                            }
                            if let Some(b) = bound {
                                constraints.push((op, b));
                            }
                        }
                        _ => {}
                    }
                }
                TypeExpr::Named {
                    name: name.unwrap_or_else(|| self.missing_ident(span)),
                    constraints,
                    optional,
                    span,
                }
            }
        }
    }

    fn block(&mut self, p: Pair<Rule>) -> Block {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut kind = BlockKind::Model;
        let mut kw_span = span;
        let mut idents = Vec::new();
        let mut fields = Vec::new();
        let mut layers = Vec::new();
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::block_kind | Rule::anon_kind => {
                    kw_span = self.span(&c);
                    kind = match c.as_str() {
                        "hardware" => BlockKind::Hardware,
                        "megatron" => BlockKind::Megatron,
                        "parallel" => BlockKind::Parallel,
                        "train" => BlockKind::Train,
                        _ => BlockKind::Model,
                    };
                }
                Rule::ident => idents.push(self.ident(c)),
                Rule::field => fields.push(self.field(c)),
                Rule::layer_assign => layers.push(self.layer_assign(c)),
                Rule::junk_item => {
                    if let Some(f) = self.junk_item(c) {
                        fields.push(f);
                    }
                }
                _ => {}
            }
        }
        let mut idents = idents.into_iter();
        Block {
            doc,
            kind,
            kw_span,
            name: idents.next(),
            parent: idents.next(),
            fields,
            layers,
            span,
        }
    }

    fn field(&mut self, p: Pair<Rule>) -> Field {
        let span = self.span(&p);
        let mut doc = Vec::new();
        let mut name = None;
        let mut value = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs => doc = self.docs(c),
                Rule::ident => name = Some(self.ident(c)),
                _ => value = Some(self.value(c)),
            }
        }
        Field {
            doc,
            name: name.unwrap_or_else(|| self.missing_ident(span)),
            value: value.unwrap_or_else(|| self.error_expr(span)),
            span,
        }
    }

    fn layer_assign(&mut self, p: Pair<Rule>) -> LayerAssign {
        let span = self.span(&p);
        let mut override_span = None;
        let mut selection = Vec::new();
        let mut selection_span = span;
        let mut field = None;
        let mut value = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::docs | Rule::kw_layers => {}
                Rule::override_kw => override_span = Some(self.span(&c)),
                Rule::selection => {
                    selection_span = self.span(&c);
                    selection = c.into_inner().map(|s| self.sel_item(s)).collect();
                }
                Rule::ident => field = Some(self.ident(c)),
                _ => value = Some(self.value(c)),
            }
        }
        LayerAssign {
            override_span,
            selection,
            selection_span,
            field: field.unwrap_or_else(|| self.missing_ident(span)),
            value: value.unwrap_or_else(|| self.error_expr(span)),
            span,
        }
    }

    fn sel_item(&mut self, p: Pair<Rule>) -> SelItem {
        let span = self.span(&p);
        let Some(inner) = p.into_inner().next() else {
            return SelItem::Index(self.error_expr(span));
        };
        if inner.as_rule() == Rule::sel_range {
            let mut exprs = inner.into_inner().filter(|c| c.as_rule() == Rule::expr);
            let start = exprs.next().map(|e| self.expr(e));
            let end = exprs.next().map(|e| self.expr(e));
            let step = exprs.next().map(|e| self.expr(e));
            SelItem::Range {
                start: Box::new(start.unwrap_or_else(|| self.error_expr(span))),
                end: Box::new(end.unwrap_or_else(|| self.error_expr(span))),
                step: step.map(Box::new),
                span,
            }
        } else {
            SelItem::Index(self.expr(inner))
        }
    }

    /// A field's value: an expression or one of the prose forms (`x`, `of`, `across`).
    fn value(&mut self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::expr => self.expr(p),
            Rule::batch_value => {
                let mut exprs = p.into_inner().filter(|c| c.as_rule() == Rule::expr);
                let a = exprs.next().map(|e| self.expr(e));
                let b = exprs.next().map(|e| self.expr(e));
                Expr {
                    kind: ExprKind::Batch {
                        sequences: Box::new(a.unwrap_or_else(|| self.error_expr(span))),
                        tokens: Box::new(b.unwrap_or_else(|| self.error_expr(span))),
                    },
                    span,
                }
            }
            Rule::of_value => {
                let mut count = None;
                let mut hardware = None;
                for c in p.into_inner() {
                    match c.as_rule() {
                        Rule::expr => count = Some(self.expr(c)),
                        Rule::ident => hardware = Some(self.ident(c)),
                        _ => {}
                    }
                }
                Expr {
                    kind: ExprKind::Of {
                        count: Box::new(count.unwrap_or_else(|| self.error_expr(span))),
                        hardware: hardware.unwrap_or_else(|| self.missing_ident(span)),
                    },
                    span,
                }
            }
            Rule::across_value => {
                let group = p
                    .into_inner()
                    .find(|c| c.as_rule() == Rule::ident)
                    .map(|c| self.ident(c));
                Expr {
                    kind: ExprKind::Across(group.unwrap_or_else(|| self.missing_ident(span))),
                    span,
                }
            }
            _ => self.error_expr(span),
        }
    }

    fn expr(&mut self, p: Pair<Rule>) -> Expr {
        // expr = term (add_op term)*, term = unary (mul_op unary)*: left-associative folds.
        let span = self.span(&p);
        let operands = p
            .clone()
            .into_inner()
            .filter(|c| matches!(c.as_rule(), Rule::term | Rule::unary))
            .count();
        if operands > MAX_CHAIN {
            self.sink
                .push(errors::chain_too_long(span, operands, MAX_CHAIN));
            return self.error_expr(span);
        }
        let mut acc: Option<Expr> = None;
        let mut op = BinOp::Add;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::add_op | Rule::mul_op => {
                    op = match c.as_str() {
                        "+" => BinOp::Add,
                        "-" => BinOp::Sub,
                        "*" => BinOp::Mul,
                        "/" => BinOp::Div,
                        _ => BinOp::Rem,
                    }
                }
                Rule::term => {
                    let rhs = self.expr(c);
                    acc = Some(fold(acc, op, rhs));
                }
                Rule::unary => {
                    let rhs = self.unary(c);
                    acc = Some(fold(acc, op, rhs));
                }
                _ => {}
            }
        }
        acc.unwrap_or_else(|| self.error_expr(span))
    }

    fn unary(&mut self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        let mut negs = 0;
        let mut atom = None;
        for c in p.into_inner() {
            if c.as_rule() == Rule::neg {
                negs += 1;
            } else {
                atom = Some(self.atom(c));
            }
        }
        let mut e = atom.unwrap_or_else(|| self.error_expr(span));
        if negs > MAX_NESTING {
            self.sink
                .push(errors::too_many_signs(span, negs, MAX_NESTING));
            return self.error_expr(span);
        }
        for _ in 0..negs {
            e = Expr {
                kind: ExprKind::Neg(Box::new(e)),
                span,
            };
        }
        e
    }

    fn atom(&mut self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::int => match digits(&p).parse::<i64>() {
                Ok(v) => ExprKind::Int(v),
                Err(_) => {
                    self.sink.push(errors::int_too_large(span));
                    ExprKind::Error
                }
            },
            Rule::float => match digits(&p).parse::<f64>() {
                Ok(v) if v.is_finite() => ExprKind::Float(v),
                _ => {
                    self.sink.push(errors::float_out_of_range(span));
                    ExprKind::Error
                }
            },
            Rule::string => {
                let raw = p.into_inner().next().map(|s| s.as_str()).unwrap_or("");
                // A string with a bad escape is an error value: what it names is unknown,
                // and checking a guess would only add errors about the guess.
                match self.unescape(raw, span) {
                    Some(text) => ExprKind::Str(text),
                    None => ExprKind::Error,
                }
            }
            Rule::bool_lit => ExprKind::Bool(p.as_str() == "true"),
            Rule::none_lit => ExprKind::None,
            Rule::name => ExprKind::Name(p.as_str().to_string()),
            Rule::tuple_or_paren => return self.tuple_or_paren(p, span),
            Rule::call => self.call(p, span),
            _ => ExprKind::Error,
        };
        Expr { kind, span }
    }

    /// `(a, b)` is a tuple, and so is `(a,)`; `(a)` is `a` with the parentheses' span.
    fn tuple_or_paren(&mut self, p: Pair<Rule>, span: Span) -> Expr {
        let text = p.as_str();
        let mut items: Vec<Expr> = p.into_inner().map(|e| self.expr(e)).collect();
        let trailing_comma = text[..text.len().saturating_sub(1)]
            .trim_end()
            .ends_with(',');
        if items.len() == 1 && !trailing_comma {
            // Parentheses for grouping: keep the inner expression, widen its span.
            let mut e = items.remove(0);
            e.span = span;
            return e;
        }
        Expr {
            kind: ExprKind::Tuple(items),
            span,
        }
    }

    /// `callee(args)`.
    fn call(&mut self, p: Pair<Rule>, span: Span) -> ExprKind {
        let mut callee = None;
        let mut args = Vec::new();
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::ident => callee = Some(self.ident(c)),
                Rule::arg => args.push(self.arg(c)),
                _ => {}
            }
        }
        ExprKind::Call {
            callee: callee.unwrap_or_else(|| self.missing_ident(span)),
            args,
        }
    }

    fn arg(&mut self, p: Pair<Rule>) -> Arg {
        let span = self.span(&p);
        let mut name = None;
        let mut value = None;
        for c in p.into_inner() {
            match c.as_rule() {
                Rule::ident => name = Some(self.ident(c)),
                Rule::expr => value = Some(self.expr(c)),
                _ => {}
            }
        }
        Arg {
            name,
            value: value.unwrap_or_else(|| self.error_expr(span)),
            span,
        }
    }

    /// The string's text, or `None` after reporting a bad escape.
    fn unescape(&mut self, raw: &str, span: Span) -> Option<String> {
        let mut out = String::with_capacity(raw.len());
        let mut ok = true;
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some(other) => {
                    self.sink.push(errors::bad_escape(span, other));
                    ok = false;
                }
                None => {}
            }
        }
        ok.then_some(out)
    }

    fn missing_ident(&self, span: Span) -> Ident {
        Ident {
            name: String::new(),
            span,
        }
    }

    fn error_expr(&self, span: Span) -> Expr {
        Expr {
            kind: ExprKind::Error,
            span,
        }
    }

    /// Reports a top-level region no item rule accepted. A broken `const NAME = ...`
    /// still declares `NAME` (with an erroneous value) so its uses are not reported
    /// again as unknown.
    fn junk_top(&mut self, p: Pair<Rule>) -> Option<Const> {
        let start = self.offset + p.as_span().start();
        let text = p.as_str();
        if self.inside_unclosed_block {
            return None;
        }
        if let Some(open) = unclosed_brace(text) {
            self.inside_unclosed_block = true;
            self.sink.push(errors::unclosed_block(Span::new(
                self.file,
                start + open,
                start + open + 1,
            )));
            return None;
        }
        self.explain(Rule::strict_top, text, start);
        let rest = text.trim_start().strip_prefix("const")?;
        let (name, at) = leading_assignment(rest)?;
        let at = start + (text.len() - rest.len()) + at;
        let span = Span::new(self.file, start, start + text.len());
        Some(Const {
            doc: Vec::new(),
            name: Ident {
                span: Span::new(self.file, at, at + name.len()),
                name,
            },
            value: self.error_expr(span),
            span,
        })
    }

    /// Reports a line in a block that is neither a field nor a layer selection. A broken
    /// `name = ...` (or `name value`) still sets `name`, to an erroneous value, so the
    /// checker does not also report it missing.
    fn junk_item(&mut self, p: Pair<Rule>) -> Option<Field> {
        let start = self.offset + p.as_span().start();
        let text = p.as_str();
        self.explain(Rule::strict_item, text, start);
        let (name, at) = leading_assignment(text).or_else(|| leading_word(text))?;
        let span = Span::new(self.file, start, start + text.len());
        Some(Field {
            doc: Vec::new(),
            name: Ident {
                span: Span::new(self.file, start + at, start + at + name.len()),
                name,
            },
            value: self.error_expr(span),
            span,
        })
    }

    /// Parses a junk region again with the strict rule and reports where exactly it
    /// goes wrong and what would have been accepted there.
    fn explain(&mut self, strict: Rule, text: &str, start: usize) {
        // Pest's detailed attempts (the tokens it expected) cost time on every parse, and
        // the switch is global: turn it on only for this re-parse, one at a time.
        static DETAIL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let result = {
            let _guard = DETAIL.lock().unwrap_or_else(|e| e.into_inner());
            pest::set_error_detail(true);
            let r = FmoeParser::parse(strict, text);
            pest::set_error_detail(false);
            r
        };
        match result {
            Err(e) => self.report_pest_error(&e, start, text, strict == Rule::strict_top),
            // The strict rule accepts what the lenient one refused only when the item
            // was not followed by the end of its line.
            Ok(_) => self.sink.push(errors::not_an_item(
                Span::new(self.file, start, start + text.len()),
                strict == Rule::strict_top,
            )),
        }
    }

    fn report_pest_error(
        &mut self,
        e: &pest::error::Error<Rule>,
        base: usize,
        text: &str,
        top: bool,
    ) {
        let (pos, expected) = pest_expected(e);
        let pos = pos.min(text.len());
        let at = base + pos;
        if let Some(open) = unterminated_quote(text) {
            let line_end = text[open..]
                .find('\n')
                .map(|i| open + i)
                .unwrap_or(text.len());
            let span = Span::new(self.file, base + open, base + line_end);
            self.sink.push(errors::unterminated_string(span));
            return;
        }
        let (mut found, len) = found_at(text, pos);
        if pos >= text.len() {
            let end_of_file = self.source_len <= base + text.len();
            found = if end_of_file {
                "end of file"
            } else {
                "end of line"
            }
            .to_string();
        }
        let expected = tidy_expected(expected, pos == 0, top);
        let span = Span::new(self.file, at, at + len);
        let suggestion = if pos == 0 {
            keyword_suggestion(text, top)
        } else {
            None
        };
        self.sink
            .push(errors::unexpected(span, &found, &expected, suggestion));
    }
}

/// A number literal's digits without its `_` separators.
fn digits(p: &Pair<Rule>) -> String {
    p.as_str().chars().filter(|c| *c != '_').collect()
}

/// Where pest's error is (the furthest position any attempt reached) and what it expected
/// there, in words: tokens in backticks, rules by [`rule_words`].
fn pest_expected(e: &pest::error::Error<Rule>) -> (usize, Vec<String>) {
    let mut pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let mut expected: Vec<String> = Vec::new();
    if let Some(attempts) = e.parse_attempts() {
        pos = pos.max(attempts.max_position);
        for t in attempts.expected_tokens() {
            let token = t.to_string();
            // Skip whitespace, comment starts and character ranges: they explain nothing.
            let noise = token.trim().is_empty()
                || token.starts_with("//")
                || (token.contains("..") && token.chars().count() == 4)
                || token.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            if !noise {
                push_unique(&mut expected, format!("`{token}`"));
            }
        }
        for stack in attempts.call_stacks() {
            let rule = stack.deepest.get_rule().copied().or(stack.parent);
            if let Some(w) = rule.and_then(rule_words) {
                push_unique(&mut expected, w.to_string());
            }
        }
    }
    if let pest::error::ErrorVariant::ParsingError { positives, .. } = &e.variant {
        for w in positives.iter().filter_map(|r| rule_words(*r)) {
            push_unique(&mut expected, w.to_string());
        }
    }
    (pos, expected)
}

/// The keyword a line's misspelt first word may be (top level: an item's; in a block: the
/// ones a block's line can start with).
fn keyword_suggestion(text: &str, top: bool) -> Option<String> {
    let first_word = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("");
    let words: &[&str] = if top {
        &[
            "use", "const", "def", "model", "parallel", "train", "hardware",
        ]
    } else {
        &["override", "layers"]
    };
    crate::diag::did_you_mean(first_word, words.iter().copied())
}

/// Offsets of `//` comments that follow code and begin like an operand (`x = a // 2`):
/// a reader from Python would take them for floor division, which they silently are not.
fn floor_division_lookalikes(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let mut in_string = false;
        let bytes = line.as_bytes();
        let mut i = 0;
        while i + 1 < bytes.len() {
            match bytes[i] {
                b'"' => in_string = !in_string,
                b'\\' if in_string => i += 1,
                b'/' if !in_string && bytes[i + 1] == b'/' => {
                    let code = line[..i].trim_end();
                    let after_operand =
                        code.ends_with(|c: char| c.is_ascii_alphanumeric() || c == ')');
                    let operand_next =
                        !line[i + 2..].starts_with('/') && reads_like_operand(&line[i + 2..]);
                    if code.contains('=') && after_operand && operand_next {
                        out.push(line_start + i);
                    }
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        line_start += line.len();
    }
    out
}

/// Whether the text of a `//` comment reads like the right operand of a division: up to
/// the first `,` or unmatched closing bracket (where a division inside a call would end), an
/// expression that starts with a digit or holds an operator (`3`, `(width + 1)`, `2 * k`),
/// not prose that happens to start with a number (`256 byte values`, `2 blocks`).
fn reads_like_operand(comment: &str) -> bool {
    let mut depth = 0usize;
    let mut end = comment.len();
    for (i, c) in comment.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' if depth == 0 => {
                end = i;
                break;
            }
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let operand = comment[..end].trim();
    let arithmetic = operand.starts_with(|c: char| c.is_ascii_digit())
        || operand.contains(['+', '-', '*', '/', '%']);
    !operand.is_empty() && arithmetic && FmoeParser::parse(Rule::comment_operand, operand).is_ok()
}

/// Brackets nest at most this deep: parsing and checking recurse once per level.
pub const MAX_NESTING: usize = 64;

/// Operands of one `+ -` or `* / %` chain at most: the chain becomes a tree as deep as it is
/// long, which checking walks recursively.
pub const MAX_CHAIN: usize = 256;

/// The offset of the first bracket nested deeper than [`MAX_NESTING`], if any
/// (strings and comments skipped).
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => in_string = !in_string,
            '\\' if in_string => {
                chars.next();
            }
            '\n' => in_string = false,
            '/' if !in_string && chars.peek().is_some_and(|(_, n)| *n == '/') => {
                while chars.peek().is_some_and(|(_, n)| *n != '\n') {
                    chars.next();
                }
            }
            '(' | '[' | '{' if !in_string => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            ')' | ']' | '}' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The byte offset of a `{` in `text` that no `}` closes, if any.
fn unclosed_brace(text: &str) -> Option<usize> {
    let mut open: Vec<usize> = Vec::new();
    let mut in_string = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '{' if !in_string => open.push(i),
            '}' if !in_string => {
                open.pop();
            }
            _ => {}
        }
    }
    open.first().copied()
}

/// The offset of a `"` that no `"` on its line closes, if any.
fn unterminated_quote(text: &str) -> Option<usize> {
    let mut open: Option<usize> = None;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match (c, open) {
            ('\n', Some(o)) => return Some(o),
            ('\\', Some(_)) if !escaped => {
                escaped = true;
                continue;
            }
            ('"', Some(_)) if !escaped => open = None,
            ('"', None) => open = Some(i),
            _ => {}
        }
        escaped = false;
    }
    open
}

/// `name =` at the start of `text`: the name and its offset.
fn leading_assignment(text: &str) -> Option<(String, usize)> {
    let (name, at) = leading_word(text)?;
    let after = text[at + name.len()..].trim_start();
    (after.starts_with('=') && !after.starts_with("==")).then_some((name, at))
}

/// A name at the start of `text` followed by something other than `(`, `.` or `[`
/// (which would make it a call or a selection, not a field): the name and its offset.
fn leading_word(text: &str) -> Option<(String, usize)> {
    let at = text.len() - text.trim_start().len();
    let word: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let first = word.chars().next()?;
    if !(first.is_ascii_alphabetic() || first == '_') || word == "layers" || word == "override" {
        return None;
    }
    let after = text[at + word.len()..].trim_start();
    if after.starts_with(['(', '.', '[']) {
        return None;
    }
    Some((word, at))
}

/// Expected tokens as a person would list them: what may start an item at the start of
/// a line; otherwise "a value" rather than every token a value may start with, and "an
/// operator" rather than each operator.
fn tidy_expected(found: Vec<String>, at_start: bool, top: bool) -> Vec<String> {
    if at_start {
        return if top {
            vec!["an item (`use`, `const`, `def`, `model`, `parallel` or `train`)".to_string()]
        } else {
            vec![
                "a field (`name = value`)".to_string(),
                "a layer selection (`layers[...].ffn = ...`)".to_string(),
            ]
        };
    }
    let has = |w: &str| found.iter().any(|f| f == w);
    let value = has("a value");
    let operator = has("an operator");
    let value_starts = [
        "`\"`", "`(`", "`-`", "`false`", "`none`", "`true`", "`across`", "a string", "a number",
        "a name",
    ];
    let operators = ["`%`", "`*`", "`+`", "`-`", "`/`"];
    let mut out: Vec<String> = found
        .into_iter()
        .filter(|f| !(value && value_starts.contains(&f.as_str())))
        .filter(|f| !(operator && operators.contains(&f.as_str())))
        .filter(|f| {
            !matches!(
                f.as_str(),
                "`of`" | "`x`" | "`tokens`" | "an item" | "a field (`name = value`)" | "`\\`"
            )
        })
        .collect();
    // Words after tokens, so the list reads `)`, `,` or an operator.
    out.sort_by_key(|f| !f.starts_with('`'));
    out
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn fold(acc: Option<Expr>, op: BinOp, rhs: Expr) -> Expr {
    match acc {
        None => rhs,
        Some(lhs) => {
            let span = lhs.span.join(rhs.span);
            Expr {
                kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                span,
            }
        }
    }
}

/// The token at `pos` as a user would name it, and its length in bytes.
fn found_at(text: &str, pos: usize) -> (String, usize) {
    let rest = text.get(pos..).unwrap_or("");
    let Some(c) = rest.chars().next() else {
        return ("end of input".to_string(), 0);
    };
    if c == '\n' || c == '\r' {
        return ("end of line".to_string(), 0);
    }
    if c.is_alphanumeric() || c == '_' {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        let word = word.trim_end_matches('.').to_string();
        let len = word.len();
        return (format!("`{word}`"), len);
    }
    if c == '"' {
        let end = rest[1..]
            .find(['"', '\n'])
            .map(|i| i + 2)
            .unwrap_or(rest.len());
        return (format!("`{}`", &rest[..end]), end);
    }
    (format!("`{c}`"), c.len_utf8())
}

/// How a grammar rule is named in an error message; `None` for rules that only repeat
/// what a token already says.
fn rule_words(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::expr | Rule::term | Rule::unary | Rule::call | Rule::tuple_or_paren => "a value",
        Rule::int => "a number",
        Rule::float => "a number",
        Rule::string | Rule::string_inner => "a string",
        Rule::ident | Rule::name => "a name",
        Rule::path_seg => "a module name",
        Rule::add_op | Rule::mul_op => "an operator",
        Rule::use_decl | Rule::const_decl | Rule::def_decl | Rule::builtin_decl => "an item",
        Rule::named_block | Rule::anon_block | Rule::block_kind | Rule::anon_kind => "an item",
        Rule::field | Rule::layer_assign => "a field (`name = value`)",
        Rule::selection | Rule::sel_item | Rule::sel_range => "a layer index or range",
        Rule::ty | Rule::ty_named | Rule::ty_tuple | Rule::ty_enum => "a type",
        Rule::cmp_op | Rule::constraint => "a bound (`> 0`)",
        Rule::arg => "an argument",
        Rule::EOI => "end of line",
        Rule::kw_step => "`step`",
        Rule::kw_x => "`x`",
        Rule::kw_of => "`of`",
        Rule::tokens_kw => "`tokens`",
        Rule::docs | Rule::doc_comment => return None,
        _ => return None,
    })
}
