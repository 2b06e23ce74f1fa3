//! The `train` block: data source, batch shape (`32 x 1024 tokens`), steps, optimizer,
//! schedule, gradient clipping, precision, checkpoint and eval policies, seed; and the
//! rules tying it to the model (sequence length within context, a byte vocabulary for
//! byte-level data) and to what exists (the built-in corpora's names; for `fmoec check`, a
//! warning for data files that are not there). How the batch splits over data ranks and
//! micro-batches is the planner's rule.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::errors;
use super::eval::Ctx;
use super::fields::{boolean, float, int, string, symbol, uint};
use super::model::*;
use super::model_rules::ctor_of;
use super::scope::ModId;
use super::value::{Bound, CtorValue, Type, Value, V};
use super::Checker;
use crate::data::tokenizer::{megatron_padded_vocab, Flavour, TextTokenizer};
use crate::diag::Span;
use crate::hf::init::Resolution;

/// Megatron-LM's `--make-vocab-size-divisible-by` default.
pub const MEGATRON_VOCAB_DIVISOR: u64 = 128;
use crate::syntax::ast::{self, CmpOp};

pub const TRAIN_FIELDS: &[&str] = &[
    "data",
    "tokenizer",
    "batch",
    "steps",
    "optimizer",
    "schedule",
    "clip_grad",
    "precision",
    "fp8_dense",
    "checkpoint",
    "eval",
    "seed",
    "init",
];

/// The corpora `builtin(...)` names (embedded in the binary; byte level, like `text(...)`).
pub use crate::data::corpus::BUILTIN_NAMES as BUILTIN_CORPORA;

/// Default seed of a `train` block without one.
pub const DEFAULT_SEED: u64 = 1234;
/// Default gradient clipping (Megatron-LM's `--clip-grad` default).
pub const DEFAULT_CLIP_GRAD: f64 = 1.0;

/// The `train` block's fields, evaluated in its module.
struct TrainBlock<'b, 'e> {
    fields: BTreeMap<String, &'b ast::Field>,
    ctx: Ctx<'e>,
    kw: Span,
}

/// The `train` block's required fields, as far as they could be read.
struct RequiredTrainFields {
    data: Option<DataSource>,
    /// The tokenizer's vocabulary size and where the tokenizer is written.
    tokenizer_vocab: Option<(u64, Span)>,
    batch: BatchShape,
    steps: Option<u64>,
    optimizer: Option<Optimizer>,
}

/// `batch`, as far as it could be read.
struct BatchShape {
    sequences: Option<u64>,
    seq_len: Option<u64>,
    /// Where the tokens per sequence are written (the whole value when only sequences are).
    tokens_span: Span,
}

impl Checker<'_> {
    pub(crate) fn train(
        &mut self,
        m: ModId,
        block: &Rc<ast::Block>,
        model: Option<&Model>,
        parallel: Option<&Parallel>,
    ) -> Option<Train> {
        let b = TrainBlock {
            fields: self.block_fields(block, TRAIN_FIELDS),
            ctx: Ctx::module(m),
            kw: block.kw_span,
        };
        let mut ok = true;
        let mut spans = TrainSpans {
            block: b.kw,
            ..Default::default()
        };
        let required = self.train_required(&b, model, &mut spans, &mut ok);
        let steps = required.steps;
        let schedule = self.train_schedule(&b, steps, spans.steps);
        let clip_grad = self.train_clip_grad(&b);
        let precision = self.train_precision(&b, &mut spans, &mut ok);
        let checkpoint = self.train_checkpoint(&b, steps, &mut spans, &mut ok);
        let eval = self.train_eval(&b, steps, spans.steps, &mut ok);
        let init = self.train_init(&b, &mut ok);
        let seed = self.train_seed(&b);
        if let Some(model) = model {
            ok &= self.train_against_model(
                model,
                parallel,
                &required.batch,
                required.tokenizer_vocab,
                required.data.as_ref(),
                &spans,
            );
            self.init_checkpoint_here(model, init.as_ref());
        }
        if !ok {
            return None;
        }
        Some(Train {
            data: required.data?,
            batch_sequences: required.batch.sequences?,
            seq_len: required.batch.seq_len?,
            steps: steps?,
            optimizer: required.optimizer?,
            schedule: schedule?,
            clip_grad: clip_grad?,
            precision: precision?,
            checkpoint: checkpoint?,
            eval: eval?,
            seed: seed?,
            init,
            spans,
        })
    }

    /// The fields a `train` block must have (`data`, `batch`, `steps`, `optimizer`), with one
    /// report of all those it leaves out.
    fn train_required(
        &mut self,
        b: &TrainBlock,
        model: Option<&Model>,
        spans: &mut TrainSpans,
        ok: &mut bool,
    ) -> RequiredTrainFields {
        let mut missing = Vec::new();
        let (data, tokenizer_vocab) = self.train_data(b, spans, ok, &mut missing);
        let batch = self.train_batch(b, model, spans, ok, &mut missing);
        let steps_v = self.field_noting_missing(
            &b.fields,
            "steps",
            &Type::positive_int(),
            b.ctx,
            &mut missing,
        );
        spans.steps = steps_v.as_ref().map(|v| v.span).unwrap_or(b.kw);
        let steps = steps_v.as_ref().map(uint);
        let optimizer = self.train_optimizer(b, &mut missing);
        if !missing.is_empty() {
            self.sink
                .push(errors::missing_fields(b.kw, "train", &missing));
        }
        RequiredTrainFields {
            data,
            tokenizer_vocab,
            batch,
            steps,
            optimizer,
        }
    }

    /// `init`, when written and readable.
    fn train_init(&mut self, b: &TrainBlock, ok: &mut bool) -> Option<InitSpec> {
        let init_v = self.typed_field(&b.fields, "init", &Type::Kind("init".into()), b.ctx);
        let init = init_v.as_ref().and_then(|v| self.init_spec(v));
        *ok &= init.is_some() || !b.fields.contains_key("init");
        init
    }

    /// `seed`, or [`DEFAULT_SEED`] when the block has none; `None` for a wrong one.
    fn train_seed(&mut self, b: &TrainBlock) -> Option<u64> {
        match self.typed_field(&b.fields, "seed", &Type::int_at_least(0), b.ctx) {
            Some(v) => Some(uint(&v)),
            None if b.fields.contains_key("seed") => None,
            None => Some(DEFAULT_SEED),
        }
    }

    /// The checkpoint to start from, read (its metadata only) when it is here: a missing one
    /// is `fmoec check`'s warning (see `data_files_here`) and `fmoec run`'s error.
    fn init_checkpoint_here(&mut self, model: &Model, init: Option<&InitSpec>) {
        if let Some(init) = init {
            match crate::hf::init::resolve(model, init) {
                Resolution::NotHere => {}
                Resolution::Failed(diags) | Resolution::Ready(_, diags) => self.sink.extend(diags),
            }
        }
    }

    /// `data` and `tokenizer`: the source, tokenized when a tokenizer is given, and the
    /// tokenizer's vocabulary (read now, so that the rules against the model can use it).
    /// A missing `data` is noted in `missing`.
    fn train_data(
        &mut self,
        b: &TrainBlock,
        spans: &mut TrainSpans,
        ok: &mut bool,
        missing: &mut Vec<(String, String)>,
    ) -> (Option<DataSource>, Option<(u64, Span)>) {
        let data_v = self.field_noting_missing(
            &b.fields,
            "data",
            &Type::Kind("data".into()),
            b.ctx,
            missing,
        );
        let data = data_v.as_ref().and_then(ctor_of).map(|c| data_source(&c));
        spans.data = data_v.as_ref().map(|v| v.span).unwrap_or(b.kw);
        if let Some(c) = data_v.as_ref().and_then(ctor_of) {
            self.builtin_corpus_exists(&c);
        }
        let tokenizer_v = self.typed_field(
            &b.fields,
            "tokenizer",
            &Type::Kind("tokenizer".into()),
            b.ctx,
        );
        *ok &= tokenizer_v.is_some() || !b.fields.contains_key("tokenizer");
        spans.tokenizer = tokenizer_v.as_ref().map_or(b.kw, |v| v.span);
        let tokenizer = tokenizer_v
            .as_ref()
            .and_then(ctor_of)
            .map(|c| tokenizer_spec(&c));
        let tokenizer_vocab = match (&tokenizer, &tokenizer_v) {
            (Some(spec), Some(v)) => self.tokenizer_vocab(spec, v.span, ok),
            _ => None,
        };
        if let (Some(DataSource::Jsonl { .. }), None) = (&data, &tokenizer) {
            if tokenizer_v.is_none() && !b.fields.contains_key("tokenizer") {
                self.sink.push(errors::jsonl_without_tokenizer(spans.data));
                *ok = false;
            }
        }
        let data = match (data, tokenizer) {
            (Some(source), Some(tokenizer)) => Some(DataSource::Tokenized {
                source: Box::new(source),
                tokenizer,
            }),
            (data, _) => data,
        };
        (data, tokenizer_vocab)
    }

    /// The vocabulary size of the tokenizer written at `span`, read now; an unreadable one is
    /// reported there.
    fn tokenizer_vocab(
        &mut self,
        spec: &TokenizerSpec,
        span: Span,
        ok: &mut bool,
    ) -> Option<(u64, Span)> {
        match TextTokenizer::load(&spec.source(), Flavour::Core) {
            Ok(t) => Some((t.vocab_size as u64, span)),
            Err(e) => {
                self.sink
                    .push(errors::tokenizer_unreadable(span, &format!("{e:#}")));
                *ok = false;
                None
            }
        }
    }

    /// `batch = SEQUENCES x TOKENS tokens`, or a sequence count at the model's context. A
    /// missing `batch` is noted in `missing`.
    fn train_batch(
        &mut self,
        b: &TrainBlock,
        model: Option<&Model>,
        spans: &mut TrainSpans,
        ok: &mut bool,
        missing: &mut Vec<(String, String)>,
    ) -> BatchShape {
        let mut shape = BatchShape {
            sequences: None,
            seq_len: None,
            tokens_span: b.kw,
        };
        let Some(f) = b.fields.get("batch") else {
            missing.push(("batch".into(), "`SEQUENCES x TOKENS tokens`".into()));
            *ok = false;
            return shape;
        };
        spans.batch = f.value.span;
        let v = self.eval(&f.value, b.ctx);
        match v.value {
            Value::Batch(s, t) => {
                shape.tokens_span = t.span;
                let s = self.conform(*s, &Type::positive_int(), "the batch's sequences", b.ctx);
                let t = self.conform(
                    *t,
                    &Type::positive_int(),
                    "the batch's tokens per sequence",
                    b.ctx,
                );
                shape.sequences = int(&s).map(|i| i as u64);
                shape.seq_len = int(&t).map(|i| i as u64);
            }
            _ => {
                shape.tokens_span = f.value.span;
                let s = self.conform(v, &Type::positive_int(), "field `batch`", b.ctx);
                shape.sequences = int(&s).map(|i| i as u64);
                shape.seq_len = model.map(|m| m.context);
            }
        }
        *ok &= shape.sequences.is_some() && shape.seq_len.is_some();
        shape
    }

    /// `optimizer`; a missing one is noted in `missing`.
    fn train_optimizer(
        &mut self,
        b: &TrainBlock,
        missing: &mut Vec<(String, String)>,
    ) -> Option<Optimizer> {
        let opt_v = self.field_noting_missing(
            &b.fields,
            "optimizer",
            &Type::Kind("optimizer".into()),
            b.ctx,
            missing,
        );
        opt_v.as_ref().and_then(ctor_of).map(|c| {
            let betas = match c.arg("betas").map(|v| &v.value) {
                Some(Value::Tuple(b)) if b.len() == 2 => (float(&b[0]), float(&b[1])),
                _ => (0.9, 0.999),
            };
            Optimizer::Adamw {
                lr: c.arg("lr").map(float).unwrap_or(0.0),
                betas,
                eps: c.arg("eps").map(float).unwrap_or(1e-8),
                weight_decay: c.arg("weight_decay").map(float).unwrap_or(0.0),
            }
        })
    }

    /// `schedule`, constant without warm-up when not written; a warm-up longer than the run
    /// is an error.
    fn train_schedule(
        &mut self,
        b: &TrainBlock,
        steps: Option<u64>,
        steps_span: Span,
    ) -> Option<Schedule> {
        let Some(v) =
            self.typed_field(&b.fields, "schedule", &Type::Kind("schedule".into()), b.ctx)
        else {
            return (!b.fields.contains_key("schedule"))
                .then_some(Schedule::Constant { warmup: 0 });
        };
        let c = ctor_of(&v)?;
        let warmup_v = c.arg("warmup").cloned();
        let warmup = warmup_v.as_ref().map(uint).unwrap_or(0);
        if let (Some(s), Some(w)) = (steps, &warmup_v) {
            if warmup > s {
                self.sink
                    .push(errors::warmup_past_steps(w.span, warmup, s, steps_span));
            }
        }
        Some(match c.name.as_str() {
            "cosine" => Schedule::Cosine {
                warmup,
                min_lr_ratio: c.arg("min_lr_ratio").map(float).unwrap_or(0.1),
            },
            _ => Schedule::Constant { warmup },
        })
    }

    /// `clip_grad`: a positive norm, `none`, or Megatron-LM's default. The outer `None`: the
    /// field is written but wrong.
    fn train_clip_grad(&mut self, b: &TrainBlock) -> Option<Option<f64>> {
        let clip_ty = Type::Optional(Box::new(Type::Float(vec![Bound {
            op: CmpOp::Gt,
            value: 0.0,
        }])));
        match self.typed_field(&b.fields, "clip_grad", &clip_ty, b.ctx) {
            Some(V {
                value: Value::None, ..
            }) => Some(None),
            Some(v) => Some(Some(float(&v))),
            None if b.fields.contains_key("clip_grad") => None,
            None => Some(Some(DEFAULT_CLIP_GRAD)),
        }
    }

    /// `precision`, and `fp8_dense`, which only `precision = fp8` takes.
    fn train_precision(
        &mut self,
        b: &TrainBlock,
        spans: &mut TrainSpans,
        ok: &mut bool,
    ) -> Option<Precision> {
        let prec_ty = Type::Enum(vec![
            "fp32".into(),
            "bf16".into(),
            "fp16".into(),
            "fp8".into(),
        ]);
        let fp8_dense = match self.typed_field(&b.fields, "fp8_dense", &Type::Bool, b.ctx) {
            Some(v) => Some(Some((boolean(&v), v.span))),
            None if b.fields.contains_key("fp8_dense") => None,
            None => Some(None),
        };
        let precision = match self.typed_field(&b.fields, "precision", &prec_ty, b.ctx) {
            Some(v) => {
                spans.precision = v.span;
                Some(match symbol(&v) {
                    "bf16" => Precision::Bf16,
                    "fp16" => Precision::Fp16,
                    "fp8" => Precision::Fp8 {
                        dense: matches!(fp8_dense, Some(Some((true, _)))),
                    },
                    _ => Precision::Fp32,
                })
            }
            None if b.fields.contains_key("precision") => None,
            None => Some(Precision::Fp32),
        };
        if let (Some(p), Some(Some((_, span)))) = (precision, fp8_dense) {
            if !matches!(p, Precision::Fp8 { .. }) {
                self.sink
                    .push(errors::fp8_dense_without_fp8(span, spans.precision));
                *ok = false;
            }
        }
        precision
    }

    /// `checkpoint = every(N, dir = ..., keep = K)` or `none`.
    fn train_checkpoint(
        &mut self,
        b: &TrainBlock,
        steps: Option<u64>,
        spans: &mut TrainSpans,
        ok: &mut bool,
    ) -> Option<Option<CheckpointPolicy>> {
        let every_ty = Type::Optional(Box::new(Type::Kind("every".into())));
        let Some(v) = self.typed_field(&b.fields, "checkpoint", &every_ty, b.ctx) else {
            return (!b.fields.contains_key("checkpoint")).then_some(None);
        };
        // `checkpoint = none`
        let Some(c) = ctor_of(&v) else {
            return Some(None);
        };
        spans.checkpoint = v.span;
        if let Some(b) = c.explicit("batches") {
            self.sink.push(errors::every_wrong_arg(
                b.span,
                "batches",
                "checkpoint",
                "eval",
            ));
            *ok = false;
        }
        if let Some(d) = c.explicit("dir").filter(|d| string(d).is_empty()) {
            self.sink.push(errors::empty_checkpoint_dir(d.span));
            *ok = false;
        }
        self.every_past_steps(&c, steps, spans.steps);
        Some(Some(CheckpointPolicy {
            every: c.arg("steps").map(uint).unwrap_or(1),
            dir: string_arg(&c, "dir"),
            keep: c.arg("keep").map(uint).unwrap_or(0),
        }))
    }

    /// `eval = every(N, batches = B)` or `none`.
    fn train_eval(
        &mut self,
        b: &TrainBlock,
        steps: Option<u64>,
        steps_span: Span,
        ok: &mut bool,
    ) -> Option<Option<EvalPolicy>> {
        let every_ty = Type::Optional(Box::new(Type::Kind("every".into())));
        let Some(v) = self.typed_field(&b.fields, "eval", &every_ty, b.ctx) else {
            return (!b.fields.contains_key("eval")).then_some(None);
        };
        // `eval = none`
        let Some(c) = ctor_of(&v) else {
            return Some(None);
        };
        for arg in ["dir", "keep"] {
            if let Some(d) = c.explicit(arg) {
                self.sink
                    .push(errors::every_wrong_arg(d.span, arg, "eval", "checkpoint"));
                *ok = false;
            }
        }
        self.every_past_steps(&c, steps, steps_span);
        Some(Some(EvalPolicy {
            every: c.arg("steps").map(uint).unwrap_or(1),
            batches: c.arg("batches").map(uint).unwrap_or(1),
        }))
    }

    /// The rules tying the block to the model: the sequence within the context, the
    /// tokenizer's vocabulary within the model's (padded as Megatron-LM pads it), a byte
    /// vocabulary for byte-level data. False where an error makes the block unusable.
    fn train_against_model(
        &mut self,
        model: &Model,
        parallel: Option<&Parallel>,
        batch: &BatchShape,
        tokenizer_vocab: Option<(u64, Span)>,
        data: Option<&DataSource>,
        spans: &TrainSpans,
    ) -> bool {
        let Some(len) = batch.seq_len else {
            return true;
        };
        if len > model.context {
            self.sink.push(errors::seq_len_past_context(
                batch.tokens_span,
                len,
                model.context,
                model.spans.context,
            ));
        }
        if let Some((size, tok_span)) = tokenizer_vocab {
            let tensor = parallel.map_or(1, |p| p.tensor);
            let padded = megatron_padded_vocab(size, MEGATRON_VOCAB_DIVISOR, tensor);
            if model.vocab < size {
                self.sink.push(errors::vocab_below_tokenizer(
                    model.spans.vocab,
                    model.vocab,
                    size,
                    padded,
                    tok_span,
                ));
                return false;
            }
            if model.vocab != padded {
                self.sink.push(errors::vocab_not_megatron_padded(
                    model.spans.vocab,
                    model.vocab,
                    size,
                    padded,
                    tensor,
                    tok_span,
                ));
            }
        } else if let Some(DataSource::Text(_) | DataSource::Builtin(_)) = data {
            if model.vocab < 256 {
                self.sink.push(errors::byte_vocab_too_small(
                    spans.data,
                    model.vocab,
                    model.spans.vocab,
                ));
            }
        }
        true
    }

    /// `from_hf(...)`, `from_checkpoint(...)` or `upcycle(...)` of one of them.
    fn init_spec(&mut self, v: &V) -> Option<InitSpec> {
        let c = ctor_of(v)?;
        let source_of = |c: &CtorValue| {
            let path = string_arg(c, "path");
            match c.name.as_str() {
                "from_hf" => Some(InitSource::Hf(path)),
                "from_checkpoint" => Some(InitSource::Checkpoint(path)),
                _ => None,
            }
        };
        if c.name != "upcycle" {
            return Some(InitSpec {
                source: source_of(&c)?,
                upcycle: None,
                span: v.span,
                source_span: v.span,
            });
        }
        let dense = c.arg("dense")?;
        let inner = ctor_of(dense)?;
        let Some(source) = source_of(&inner) else {
            self.sink.push(errors::upcycle_of_upcycle(dense.span));
            return None;
        };
        Some(InitSpec {
            source,
            upcycle: Some(Upcycle {
                noise: c.arg("noise").map(float).unwrap_or(0.0),
            }),
            span: v.span,
            source_span: dense.span,
        })
    }

    /// A built-in corpus must be one the binary has.
    fn builtin_corpus_exists(&mut self, c: &super::value::CtorValue) {
        if c.name != "builtin" {
            return;
        }
        let Some(arg) = c.arg("name") else {
            return;
        };
        let name = string(arg);
        if !BUILTIN_CORPORA.contains(&name.as_str()) {
            let help = crate::diag::did_you_mean(&name, BUILTIN_CORPORA.iter().copied());
            self.sink.push(errors::unknown_corpus(
                arg.span,
                &name,
                BUILTIN_CORPORA,
                help,
            ));
        }
    }

    fn every_past_steps(
        &mut self,
        c: &super::value::CtorValue,
        steps: Option<u64>,
        steps_span: Span,
    ) {
        if let (Some(s), Some(e)) = (steps, c.arg("steps")) {
            if uint(e) > s {
                self.sink
                    .push(errors::every_past_steps(e.span, uint(e), s, steps_span));
            }
        }
    }
}

/// What `train` reads, relative to the working directory as `fmoec run` reads it: warnings
/// for what is not here, the data files (W0009) and the checkpoint to start from (W0611), and
/// an error for a Megatron dataset that is here but truncated (E0615, from its index header
/// alone). Only `fmoec check` asks: the data of a plan or an emitted Megatron training lives
/// where it will run, not here.
pub fn data_files_here(train: &Train) -> Vec<crate::diag::Diagnostic> {
    fn files(source: &DataSource) -> Vec<String> {
        match source {
            DataSource::Builtin(_) => Vec::new(),
            DataSource::Text(path) | DataSource::Jsonl { path, .. } => vec![path.clone()],
            DataSource::Megatron(prefix) => [".bin", ".idx"]
                .iter()
                .map(|ext| format!("{prefix}{ext}"))
                .collect(),
            DataSource::Tokenized { source, .. } => files(source),
        }
    }
    fn megatron_prefix(source: &DataSource) -> Option<&str> {
        match source {
            DataSource::Megatron(prefix) => Some(prefix),
            DataSource::Tokenized { source, .. } => megatron_prefix(source),
            _ => None,
        }
    }
    let missing: Vec<String> = files(&train.data)
        .into_iter()
        .filter(|f| !std::path::Path::new(f).is_file())
        .collect();
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(errors::data_file_missing(train.spans.data, &missing));
    } else if let Some(prefix) = megatron_prefix(&train.data) {
        if let Err(problem) = crate::data::indexed::check_dataset(prefix) {
            out.push(errors::megatron_dataset_damaged(train.spans.data, &problem));
        }
    }
    if let Some(init) = &train.init {
        let path = init.source.path();
        if !std::path::Path::new(path).exists() {
            out.push(crate::hf::init::not_found(init.source_span, path));
        }
    }
    out
}

/// A constructor's string argument (its default when not written).
fn string_arg(c: &CtorValue, name: &str) -> String {
    c.arg(name).map(string).unwrap_or_default()
}

/// The data source a `data = ...` constructor names.
fn data_source(c: &CtorValue) -> DataSource {
    match c.name.as_str() {
        "text" => DataSource::Text(string_arg(c, "path")),
        "megatron" => DataSource::Megatron(string_arg(c, "prefix")),
        "jsonl" => DataSource::Jsonl {
            path: string_arg(c, "path"),
            key: string_arg(c, "key"),
        },
        _ => DataSource::Builtin(string_arg(c, "name")),
    }
}

/// The tokenizer a `tokenizer = ...` constructor names.
fn tokenizer_spec(c: &CtorValue) -> TokenizerSpec {
    match c.name.as_str() {
        "gpt2" => TokenizerSpec::Gpt2 {
            vocab: string_arg(c, "vocab"),
            merges: string_arg(c, "merges"),
        },
        _ => TokenizerSpec::Hf {
            path: string_arg(c, "path"),
        },
    }
}
