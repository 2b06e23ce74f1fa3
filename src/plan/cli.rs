//! `fmoec plan`: command-line arguments and output.
//!
//! Reads and checks the file through the driver, applies the what-if overrides, and
//! prints the plan (table, JSON or DOT) or the `--auto` search report. Planner
//! diagnostics are rendered like the front end's, against the user's file.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::check::{Checked, ExpertGroup, MegatronTarget};
use crate::diag::path_text;
use crate::driver::{self, DiagFormat};
use crate::graph;

use super::{render, search, MemoryModel, Overrides, ParallelPlan, TargetRules};

/// How the plan is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanFormat {
    /// Readable tables.
    #[default]
    Table,
    /// The JSON document described in README.md.
    Json,
    /// The model graph in Graphviz DOT, one cluster per pipeline stage.
    Dot,
}

impl PlanFormat {
    /// The name `--format` takes.
    fn name(self) -> &'static str {
        match self {
            PlanFormat::Table => "table",
            PlanFormat::Json => "json",
            PlanFormat::Dot => "dot",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The model file.
    pub file: PathBuf,
    /// How the plan is printed.
    #[arg(long, value_enum, default_value_t)]
    pub format: PlanFormat,
    /// Search tensor, pipeline, expert-group size and micro-batch for the fastest plans
    /// that fit; print the best few and why the others were rejected (a table; `--world`,
    /// `--memory-model`, `--routing-skew` and `--megatron` hold for every layout tried).
    #[arg(long, conflicts_with_all = ["tensor", "pipeline", "expert_group", "micro_batch", "virtual_stages"])]
    pub auto: bool,
    /// How many plans `--auto` prints (1 or more).
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = at_least_one, requires = "auto")]
    pub top: usize,
    /// Override the number of GPUs (world size).
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub world: Option<u64>,
    /// Override the tensor-parallel size.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub tensor: Option<u64>,
    /// Override the pipeline-parallel size.
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub pipeline: Option<u64>,
    /// Override the expert group: `data` (the data-parallel group), `replicated`, or a
    /// size dividing the data-parallel size.
    #[arg(long, value_name = "data|replicated|N", value_parser = parse_expert_group)]
    pub expert_group: Option<ExpertGroup>,
    /// Override the micro-batch (sequences per data rank).
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub micro_batch: Option<u64>,
    /// Override the model chunks per pipeline stage (`virtual_stages`: 2 or more runs
    /// Megatron-LM's interleaved schedule).
    #[arg(long, value_name = "N", value_parser = driver::one_or_more::<u64>)]
    pub virtual_stages: Option<u64>,
    /// Whose memory to estimate: `megatron` (Megatron-LM v2.2 with FastMoE, what `fmoec
    /// emit` produces) or `fmoec` (the built-in runtime of `fmoec run`).
    #[arg(
        long,
        value_enum,
        value_name = "megatron|fmoec",
        conflicts_with = "megatron"
    )]
    pub memory_model: Option<MemoryModel>,
    /// Assume skewed routing: the busiest expert of each MoE layer takes this many times
    /// the mean load (1 = balanced, the default; `fmoec bench moe --routing skewed` is 3).
    /// The time estimate waits for the busiest rank, and the plan shows what FasterMoE's
    /// dynamic shadowing does about it.
    #[arg(long, value_name = "X", value_parser = parse_skew)]
    pub routing_skew: Option<f64>,
    /// Plan the training `fmoec emit --megatron VERSION` writes: that target's rank layout,
    /// vocabulary and memory (`core_v0.19`: Megatron-Core's expert grid, distributed optimizer,
    /// sequence parallelism). Default: FastMoE on Megatron-LM v2.2. `fmoec emit --megatron
    /// list` names the targets.
    #[arg(long, value_name = "VERSION")]
    pub megatron: Option<String>,
    /// How diagnostics are printed: `human`, or `json` (one array on stderr).
    #[arg(long, value_enum, default_value_t)]
    pub diagnostics: DiagFormat,
}

fn parse_expert_group(s: &str) -> Result<ExpertGroup, String> {
    match s {
        "data" => Ok(ExpertGroup::AcrossData),
        "replicated" => Ok(ExpertGroup::Replicated),
        n => match n.parse::<u64>() {
            Ok(size) if size > 0 => Ok(ExpertGroup::Size { size }),
            _ => Err(format!(
                "expected `data`, `replicated` or a number of 1 or more, found `{n}`"
            )),
        },
    }
}

impl PlanArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            world: self.world,
            tensor: self.tensor,
            pipeline: self.pipeline,
            expert_group: self.expert_group,
            micro_batch: self.micro_batch,
            virtual_stages: self.virtual_stages,
            memory_model: self.memory_model,
            routing_skew: self.routing_skew,
        }
    }
}

/// The target `--megatron` names; a message naming the known ones otherwise.
fn find_target(version: &str) -> Result<MegatronTarget, String> {
    let mut targets = crate::check::megatron_targets();
    match targets.iter().position(|t| t.version == version) {
        Some(i) => Ok(targets.swap_remove(i)),
        None => Err(format!(
            "no Megatron-LM target `{version}` to plan for; known: {} (`fmoec emit --megatron \
             list` says what each supports)",
            targets
                .iter()
                .map(|t| t.version.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `fmoec plan`: the target asked for, the file loaded and planned (or the layouts searched,
/// with `--auto`), what the target refuses refused, the plan printed.
pub fn run(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let target = match target_asked(args) {
        Ok(target) => target,
        Err(code) => return Ok(code),
    };
    if let Err(code) = auto_prints_a_table(args) {
        return Ok(code);
    }
    let overrides = args.overrides();
    let rules = target.as_ref().map(TargetRules::of).unwrap_or_default();
    // The front end and the planner's rules (under the overrides, for the target) run in
    // one pass and report together; `--auto` plans for itself.
    let planning = if args.auto {
        driver::Planning::None
    } else {
        driver::Planning::For(&overrides, &rules)
    };
    let loaded = match driver::load_with(
        &args.file,
        args.diagnostics,
        driver::Rules {
            planning,
            data_files: false,
            warnings: driver::Warnings::All,
        },
    ) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if args.auto {
        return Ok(print_search(&loaded.checked, &overrides, &rules, args.top));
    }
    let Some(plan) = &loaded.plan else {
        anyhow::bail!("no plan was made (a bug in fmoec; please report it)")
    };
    if let Some(target) = &target {
        if let Some(code) = target_refuses(args, &loaded, plan, target, &overrides)? {
            return Ok(code);
        }
    }
    crate::out!("{}", rendered(args.format, &loaded.checked, plan));
    Ok(ExitCode::SUCCESS)
}

/// The target `--megatron` names (`None` without the flag); exit code 2, with the known
/// targets named, where there is no such target.
fn target_asked(args: &PlanArgs) -> Result<Option<MegatronTarget>, ExitCode> {
    match args.megatron.as_deref().map(find_target) {
        None => Ok(None),
        Some(Ok(target)) => Ok(Some(target)),
        Some(Err(message)) => {
            driver::report_error(&message, None, args.diagnostics);
            Err(ExitCode::from(2))
        }
    }
}

/// `--auto` ranks many layouts in one table; JSON and DOT describe one plan: exit code 2 for
/// `--auto` with another `--format`.
fn auto_prints_a_table(args: &PlanArgs) -> Result<(), ExitCode> {
    if !args.auto || args.format == PlanFormat::Table {
        return Ok(());
    }
    driver::report_error(
        &format!(
            "--auto prints a ranking of layouts, not one plan, so it has no --format {}; \
             run `fmoec plan --auto` first, then `--format {}` with the layout you pick \
             (`--tensor T --pipeline P --expert-group E --micro-batch M`)",
            args.format.name(),
            args.format.name()
        ),
        None,
        args.diagnostics,
    );
    Err(ExitCode::from(2))
}

/// `--auto`: the `top` fastest layouts that fit and why the others were rejected; exit code 1
/// where none fits.
fn print_search(
    checked: &Checked,
    overrides: &Overrides,
    rules: &TargetRules,
    top: usize,
) -> ExitCode {
    let result = search::search_for(checked, overrides, rules);
    crate::out!("{}", search::report(&result, top));
    if result.feasible.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The training `emit` would write: what the target cannot express is refused here too (exit
/// code 1, so that no plan is shown for a refused emit), and what it approximates is said.
fn target_refuses(
    args: &PlanArgs,
    loaded: &driver::Loaded,
    plan: &ParallelPlan,
    target: &MegatronTarget,
    overrides: &Overrides,
) -> anyhow::Result<Option<ExitCode>> {
    let version = &target.version;
    let all = crate::check::megatron_targets();
    let emit_runtime = crate::emit::Runtime::Fmoec;
    match crate::emit::validate(&loaded.checked, plan, target, &all, emit_runtime) {
        Ok(warnings) => {
            driver::report(&loaded.sources, &warnings, args.diagnostics);
            Ok(None)
        }
        Err(crate::emit::EmitError::Model(diagnostics)) => {
            let diagnostics = super::plan_error(diagnostics, overrides);
            driver::report(&loaded.sources, &diagnostics, args.diagnostics);
            if args.diagnostics == DiagFormat::Human {
                crate::errln!(
                    "error: Megatron-LM {version} cannot train `{}` as planned (`fmoec emit --megatron {version}` refuses it too)",
                    path_text(&args.file)
                );
            }
            Ok(Some(ExitCode::from(1)))
        }
        Err(e) => anyhow::bail!("{e}"),
    }
}

/// The plan as `--format` prints it.
fn rendered(format: PlanFormat, checked: &Checked, plan: &ParallelPlan) -> String {
    match format {
        PlanFormat::Table => render::table(plan),
        PlanFormat::Json => render::json(plan),
        PlanFormat::Dot => {
            let g = graph::lower(&checked.model, plan.seq_len);
            render::dot(plan, &g)
        }
    }
}

/// `--routing-skew`: a finite number of at least 1.
fn parse_skew(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok(x),
        Ok(x) => Err(format!(
            "must be a number of at least 1 (the busiest expert's load over the mean), not {x}"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `--top`: a count of 1 or more.
fn at_least_one(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
