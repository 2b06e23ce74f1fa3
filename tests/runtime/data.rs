//! `fmoec data` and `fmoec tokenizer train` as a user runs them: the golden datasets Megatron-LM's
//! own script wrote (tests/data_golden/README.md) come out byte for byte, bad inputs end in
//! located errors that leave nothing written, and what `fmoec data` writes is what the
//! runtime reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data_golden")
}

fn fmoec(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fmoec"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("fmoec runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// tests/data_golden/tok/vocab.json padded with `<|pad_N|>` to 65,500 entries (as
/// make_corpus.py --pad-vocab writes it).
fn wide_vocab(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(golden().join("tok/vocab.json")).unwrap();
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap();
    for i in vocab.len()..65500 {
        vocab.insert(format!("<|pad_{i}|>"), i.into());
    }
    let path = dir.join("vocab-65500.json");
    std::fs::write(&path, serde_json::to_string(&vocab).unwrap()).unwrap();
    path
}

#[test]
fn every_golden_case_is_byte_identical_to_megatron() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let wide = wide_vocab(tmp.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let vocab = s(&g.join("tok/vocab.json"));
    let merges = s(&g.join("tok/merges.txt"));
    let hf = s(&g.join("tok/tokenizer.json"));
    let gpt2 = vec![
        "--vocab-file".to_string(),
        vocab.clone(),
        "--merge-file".into(),
        merges.clone(),
    ];
    let gpt2_wide = vec![
        "--vocab-file".to_string(),
        s(&wide),
        "--merge-file".into(),
        merges.clone(),
    ];
    let hf_args = vec!["--tokenizer".to_string(), hf];
    let keys = ["--append-eod", "--json-keys", "text", "title"];
    /// (folder, Megatron, input, tokenizer flags, other flags)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a Vec<String>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        ("v22-gpt2", "v2.2", "corpus.jsonl", &gpt2, &keys),
        ("v22-gpt2-edge", "v2.2", "edge.jsonl", &gpt2, &[]),
        (
            "v22-gpt2-int32",
            "v2.2",
            "corpus.jsonl",
            &gpt2_wide,
            &["--append-eod"],
        ),
        ("core-gpt2", "core", "corpus.jsonl", &gpt2, &keys),
        (
            "core-gpt2-edge",
            "core",
            "edge.jsonl",
            &gpt2,
            &["--append-eod"],
        ),
        (
            "core-gpt2-sentences",
            "core",
            "sentences.jsonl",
            &gpt2,
            &["--append-eod"],
        ),
        (
            "core-hf",
            "core",
            "corpus.jsonl",
            &hf_args,
            &["--append-eod"],
        ),
    ];
    let mut compared = 0;
    for (name, flavour, input, tok, extra) in cases {
        let prefix = tmp.path().join(name).join("out");
        let mut args: Vec<String> = vec![
            "data".into(),
            "--megatron".into(),
            flavour.into(),
            "--input".into(),
            s(&g.join(input)),
            "--output-prefix".into(),
            s(&prefix),
        ];
        args.extend(tok.iter().cloned());
        args.extend(extra.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = fmoec(&argv, tmp.path());
        assert!(out.status.success(), "{name}: {}", text(&out));
        for entry in std::fs::read_dir(g.join("expected").join(name)).unwrap() {
            let want = entry.unwrap().path();
            let got = tmp.path().join(name).join(want.file_name().unwrap());
            let (w, r) = (std::fs::read(&want).unwrap(), std::fs::read(&got).unwrap());
            assert!(w == r, "{name}: {} differs from Megatron's", got.display());
            compared += 1;
        }
    }
    assert_eq!(compared, 18);
}

fn corpus_args(dir: &Path, input: &str, prefix: &str) -> Vec<String> {
    let g = golden();
    vec![
        "data".into(),
        "--input".into(),
        dir.join(input).to_str().unwrap().into(),
        "--output-prefix".into(),
        dir.join(prefix).to_str().unwrap().into(),
        "--tokenizer".into(),
        g.join("tok/tokenizer.json").to_str().unwrap().into(),
        "--append-eod".into(),
    ]
}

fn run_args(args: &[String], dir: &Path) -> Output {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    fmoec(&argv, dir)
}

#[test]
fn bad_lines_are_located_and_leave_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cases = [
        (
            "{\"text\": \"ok\"}\n{\"text\": \"ok\"\n",
            "bad.jsonl:2: not a JSON object",
        ),
        (
            "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n",
            "bad.jsonl:2: the JSON object has no key `text`",
        ),
        ("{\"text\": 12}\n", "bad.jsonl:1: `text` is not a string"),
    ];
    for (content, message) in cases {
        std::fs::write(dir.join("bad.jsonl"), content).unwrap();
        let out = run_args(&corpus_args(dir, "bad.jsonl", "out"), dir);
        assert!(!out.status.success());
        assert!(text(&out).contains(message), "{}", text(&out));
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "bad.jsonl")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    std::fs::write(dir.join("bad.jsonl"), b"{\"text\": \"\xff\"}\n").unwrap();
    let out = run_args(&corpus_args(dir, "bad.jsonl", "out"), dir);
    assert!(
        text(&out).contains("bad.jsonl:1: not valid UTF-8"),
        "{}",
        text(&out)
    );
}

#[test]
fn existing_outputs_are_kept_without_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("c.jsonl"),
        "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("out_text_document.bin"), "precious").unwrap();
    let args = corpus_args(dir, "c.jsonl", "out");
    let out = run_args(&args, dir);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("exists; pass --overwrite"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(dir.join("out_text_document.bin")).unwrap(),
        b"precious"
    );
    assert!(!dir.join("out_text_document.idx").exists());
    let mut args = args;
    args.push("--overwrite".into());
    let out = run_args(&args, dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 documents") && text(&out).contains("1 blank lines skipped"));
}

#[test]
fn megatron_failures_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let g = golden();
    std::fs::write(dir.join("e.jsonl"), "{\"text\": \"a\"}\n{\"text\": \"\"}\n").unwrap();
    let gpt2 = |extra: &[&str]| {
        let mut a = vec![
            "data".to_string(),
            "--input".into(),
            "e.jsonl".into(),
            "--output-prefix".into(),
            "o".into(),
            "--vocab-file".into(),
            g.join("tok/vocab.json").to_str().unwrap().into(),
            "--merge-file".into(),
            g.join("tok/merges.txt").to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        run_args(&a, dir)
    };
    let out = gpt2(&["--megatron", "v2.2", "--append-eod"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("e.jsonl:2: `text` has no tokens"),
        "{}",
        text(&out)
    );
    let out = gpt2(&["--split-sentences"]);
    assert!(
        text(&out).contains("--split-sentences is not supported"),
        "{}",
        text(&out)
    );
    let out = gpt2(&["--workers", "0"]);
    assert!(
        text(&out).contains("--workers must be at least 1"),
        "{}",
        text(&out)
    );
    let out = gpt2(&["--append-eod", "--eod-token", "<eos>"]);
    assert!(
        text(&out).contains("no end-of-document token `<eos>`"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("o_text_document.bin").exists());
}

#[test]
fn a_text_file_is_one_document() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let body = "To be, or not to be:\nthat is the question.\n";
    std::fs::write(dir.join("play.txt"), body).unwrap();
    std::fs::write(
        dir.join("play.jsonl"),
        format!("{}\n", serde_json::json!({ "text": body })),
    )
    .unwrap();
    for (input, prefix) in [("play.txt", "t"), ("play.jsonl", "j")] {
        let out = run_args(&corpus_args(dir, input, prefix), dir);
        assert!(out.status.success(), "{}", text(&out));
    }
    for ext in ["bin", "idx"] {
        assert_eq!(
            std::fs::read(dir.join(format!("t_text_document.{ext}"))).unwrap(),
            std::fs::read(dir.join(format!("j_text_document.{ext}"))).unwrap()
        );
    }
}

#[test]
fn tokenizer_train_writes_both_formats_and_keeps_existing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let corpus: String = (0..200)
        .map(|i| format!("the cat sat on the mat {i} times; the dog did not.\n"))
        .collect();
    std::fs::write(dir.join("c.txt"), &corpus).unwrap();
    let train = |extra: &[&str]| {
        let mut a = vec!["tokenizer", "train", "c.txt", "-o", "tok"];
        a.extend(extra);
        fmoec(&a, dir)
    };
    let out = train(&["--vocab-size", "300"]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(dir.join("tok").join(f).is_file(), "{f}");
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tok/vocab.json")).unwrap())
            .unwrap();
    assert_eq!(vocab.len(), 300);
    assert_eq!(vocab["<|endoftext|>"], 0);
    let before = std::fs::read(dir.join("tok/tokenizer.json")).unwrap();
    let out = train(&["--vocab-size", "280"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("exists; pass --overwrite"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(dir.join("tok/tokenizer.json")).unwrap(),
        before
    );
    let out = train(&["--vocab-size", "10", "--overwrite"]);
    assert!(
        text(&out).contains("is below the 256 byte tokens"),
        "{}",
        text(&out)
    );

    // the trained tokenizer preprocesses through both of its forms alike
    std::fs::write(
        dir.join("c.jsonl"),
        format!("{}\n", serde_json::json!({"text": corpus})),
    )
    .unwrap();
    let hf = fmoec(
        &[
            "data",
            "--input",
            "c.jsonl",
            "--output-prefix",
            "h",
            "--tokenizer",
            "tok/tokenizer.json",
        ],
        dir,
    );
    let gpt2 = fmoec(
        &[
            "data",
            "--input",
            "c.jsonl",
            "--output-prefix",
            "g",
            "--vocab-file",
            "tok/vocab.json",
            "--merge-file",
            "tok/merges.txt",
        ],
        dir,
    );
    assert!(
        hf.status.success() && gpt2.status.success(),
        "{}{}",
        text(&hf),
        text(&gpt2)
    );
    assert_eq!(
        std::fs::read(dir.join("h_text_document.bin")).unwrap(),
        std::fs::read(dir.join("g_text_document.bin")).unwrap()
    );
}

/// `--sample` of a model trained through a tokenizer encodes the prompt and decodes the
/// sample with that tokenizer (it read the ids as bytes, printing U+FFFD for every id past
/// 255); a Megatron dataset without its tokenizer is refused, since its ids are not text.
#[cfg(feature = "runtime")]
#[test]
fn sampling_decodes_through_the_train_blocks_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = fmoec(
        &[
            "tokenizer",
            "train",
            "--builtin",
            "shakespeare",
            "--vocab-size",
            "512",
            "-o",
            "tok",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let model = |name: &str, data: &str| {
        format!(
            "model {name} {{\n    vocab = 512\n    context = 32\n    width = 32\n    heads = 2\n    depth = 1\n    block = transformer(attention = causal(), ffn = mlp(hidden = 64, act = gelu))\n}}\n\ntrain {{\n    {data}\n    batch = 4 x 32 tokens\n    steps = 20\n    optimizer = adamw(lr = 1e-2)\n}}\n"
        )
    };
    let tokenized = model(
        "tokenized",
        "data = builtin(\"shakespeare\")\n    tokenizer = hf(\"tok/tokenizer.json\")",
    );
    std::fs::write(dir.join("tokenized.fmoe"), tokenized).unwrap();
    let out = fmoec(&["run", "tokenized.fmoe", "--quiet"], dir);
    assert!(out.status.success(), "{}", text(&out));
    let out = fmoec(
        &[
            "run",
            "tokenized.fmoe",
            "--sample",
            "ROMEO:",
            "--sample-tokens",
            "12",
            "--temperature",
            "0",
        ],
        dir,
    );
    let sample = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(sample.starts_with("ROMEO:"), "{sample}");
    assert!(!sample.contains('\u{fffd}'), "{sample:?}");
    // tokens of the tokenizer are longer than bytes: 12 of them make more than 12 characters
    assert!(sample.chars().count() > "ROMEO:".len() + 12, "{sample:?}");

    let bare = model("bare", "data = megatron(\"data/corpus_text_document\")");
    std::fs::write(dir.join("bare.fmoe"), bare).unwrap();
    let out = fmoec(
        &[
            "run",
            "bare.fmoe",
            "--sample",
            "x",
            "--resume",
            "runs/tokenized/checkpoints",
        ],
        dir,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains(
            "--sample cannot turn the ids of `megatron(\"data/corpus_text_document\")` into text"
        ),
        "{}",
        text(&out)
    );
}

/// `megatron("prefix")` in a run reads what `fmoec data` writes.
#[cfg(feature = "runtime")]
#[test]
fn the_runtime_reads_what_fmoec_data_writes() {
    use fmoec::runtime::data::IndexedDataset;
    let g = golden();
    let prefix = g.join("expected/core-gpt2-edge/out_text_document");
    let ds = IndexedDataset::open(prefix.to_str().unwrap()).unwrap();
    let tokenizer = fmoec::data::tokenizer::TextTokenizer::load(
        &fmoec::data::tokenizer::TokenizerSource::Gpt2 {
            vocab: g.join("tok/vocab.json"),
            merges: g.join("tok/merges.txt"),
        },
        fmoec::data::tokenizer::Flavour::Core,
    )
    .unwrap();
    let eod = tokenizer.eod(None).unwrap() as i64;
    // the first document of edge.jsonl, its tokens and the end-of-document id
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(g.join("edge.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let mut want: Vec<i64> = tokenizer
        .encode(first["text"].as_str().unwrap())
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    want.push(eod);
    assert_eq!(ds.sequence(0).unwrap(), want);
    // edge.jsonl has 48 documents, 4 of them empty: 44 sequences
    assert_eq!(ds.doc_idx.len(), 49);
    assert_eq!(ds.sizes.len(), 44);
}

mod fast_path {
    use super::golden;
    use fmoec::data::tokenizer::{Flavour, TextTokenizer, TokenizerSource};
    use proptest::prelude::*;

    fn tokenizer() -> TextTokenizer {
        TextTokenizer::load(
            &TokenizerSource::Json(golden().join("tok/tokenizer.json")),
            Flavour::Core,
        )
        .unwrap()
    }

    /// Characters that sit on every boundary of GPT-2's pattern.
    const ALPHABET: &[&str] = &[
        "a",
        "Z",
        "é",
        "ß",
        "中",
        "ǅ",
        "1",
        "١",
        "½",
        "Ⅻ",
        "'",
        "s",
        "t",
        "re",
        "ve",
        "ll",
        "d",
        "m",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "\u{a0}",
        "\u{3000}",
        "\u{85}",
        "\u{1f}",
        "\u{2028}",
        "!",
        ".",
        "\"",
        "👍🏽",
        "\u{200d}",
        "\u{301}",
        "-",
        "<|endoftext|>",
        "<|",
        "|>",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn fast_byte_level_path_gives_the_pipelines_ids(parts in prop::collection::vec(0..ALPHABET.len(), 0..40)) {
            let tk = tokenizer();
            let text: String = parts.iter().map(|&i| ALPHABET[i]).collect();
            prop_assert_eq!(tk.encode(&text).unwrap(), tk.encode_with_pipeline(&text).unwrap(), "{:?}", text);
        }
    }

    #[test]
    fn the_golden_corpus_takes_the_fast_path_to_the_same_ids() {
        let tk = tokenizer();
        let corpus = std::fs::read_to_string(golden().join("corpus.jsonl")).unwrap();
        for line in corpus.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = v["text"].as_str().unwrap();
            assert_eq!(
                tk.encode(text).unwrap(),
                tk.encode_with_pipeline(text).unwrap()
            );
        }
    }
}

/// `data = jsonl(...)` with `tokenizer = hf(...)` streams the tokens `fmoec data --append-eod`
/// writes for the same file, so training on either reads the same windows.
#[cfg(feature = "runtime")]
#[test]
fn a_tokenized_jsonl_source_streams_what_fmoec_data_writes() {
    use fmoec::check::{DataSource, TokenizerSpec};
    use fmoec::runtime::data::Dataset;
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("c");
    let mut args = corpus_args(&g, "corpus.jsonl", "x");
    args[4] = prefix.to_str().unwrap().into();
    let out = run_args(&args, tmp.path());
    assert!(out.status.success(), "{}", text(&out));
    let tokenizer = TokenizerSpec::Hf {
        path: g.join("tok/tokenizer.json").to_str().unwrap().into(),
    };
    let jsonl = DataSource::Tokenized {
        source: Box::new(DataSource::Jsonl {
            path: g.join("corpus.jsonl").to_str().unwrap().into(),
            key: "text".into(),
        }),
        tokenizer,
    };
    let megatron = DataSource::Megatron(format!("{}_text_document", prefix.display()));
    let a = Dataset::load(&jsonl, 1024).unwrap();
    let b = Dataset::load(&megatron, 1024).unwrap();
    assert_eq!(a.len(), b.len());
    for step in 0..4u64 {
        let key = [1234, step];
        let (x, y) = (
            a.batch(false, &key, 4, 33, tch::Device::Cpu).unwrap(),
            b.batch(false, &key, 4, 33, tch::Device::Cpu).unwrap(),
        );
        assert!(x.equal(&y));
    }
    assert!(
        Dataset::load(&jsonl, 1000).is_err(),
        "ids past the vocabulary are refused"
    );
}

/// `fmoec export --hf`: for each supported architecture a model is initialised (every
/// parameter perturbed, so no norm gain is 1 and no bias 0), saved as a checkpoint, exported,
/// loaded by transformers (CPU, fp32) and its logits compared with fmoec's forward on the same
/// tokens; files of a wrong kind are refused with located diagnostics.
#[cfg(feature = "runtime")]
mod hf_export {
    use super::{fmoec, golden, text};
    use std::path::Path;
    use tch::{Device, Kind, Tensor};

    fn model_file(ffn: &str, layers: &str, extra: &str) -> String {
        format!(
            "use std.gates.*\n\nmodel m {{\n    vocab = 1024\n    context = 32\n    width = 64\n    heads = 4\n    kv_heads = 2\n    depth = 3\n    norm = rmsnorm\n    positions = rotary\n{extra}\n    block = transformer(attention = causal(), ffn = {ffn})\n{layers}\n}}\n\ntrain {{\n    data = text(\"corpus.txt\")\n    tokenizer = hf(\"{}\")\n    batch = 2 x 32 tokens\n    steps = 1\n    optimizer = adamw(lr = 1e-3)\n}}\n",
            golden().join("tok/tokenizer.json").display()
        )
    }

    /// Writes the file, a perturbed initial checkpoint, and fmoec's logits; returns the export folder.
    fn export(dir: &Path, source: &str) -> std::process::Output {
        std::fs::write(dir.join("m.fmoe"), source).unwrap();
        let mut sources = fmoec::diag::Sources::new();
        let file = sources.add("m.fmoe", source.to_string());
        let mut sink = fmoec::diag::Sink::new();
        let checked =
            fmoec::check::check_file(&mut sources, file, &mut sink).expect("the file checks");
        let _rng = fmoec::runtime::model::lock_rng();
        tch::manual_seed(7);
        let t = fmoec::runtime::model::Transformer::new(
            &checked.model,
            Device::Cpu,
            Kind::Float,
            Kind::Float,
        )
        .unwrap();
        tch::no_grad(|| {
            for p in &t.store.params {
                let noise = Tensor::randn(p.tensor.size(), (Kind::Float, Device::Cpu)) * 0.05;
                let _ = p.tensor.shallow_clone().g_add_(&noise);
            }
        });
        let optim =
            fmoec::runtime::optim::AdamW::new(&checked.train.as_ref().unwrap().optimizer, &t.store)
                .unwrap();
        let info = fmoec::runtime::checkpoint::SaveInfo {
            model: &checked.model,
            step: 0,
            total_steps: 0,
            tokens_seen: 0,
            seed: 7,
            data_source: "test".into(),
            precision: "fp32".into(),
            model_file: None,
        };
        fmoec::runtime::checkpoint::save(&dir.join("ckpt"), &info, &t.store, &optim).unwrap();
        let tokens: Vec<Vec<i64>> = (0..2)
            .map(|b| (0..17).map(|i| (i * 37 + b * 11 + 5) % 1024).collect())
            .collect();
        let input = Tensor::from_slice2(&tokens);
        let logits = tch::no_grad(|| t.forward(&input, false))
            .unwrap()
            .logits
            .contiguous();
        let mut bytes = vec![0u8; logits.numel() * 4];
        logits.copy_data_u8(&mut bytes, logits.numel());
        std::fs::write(dir.join("logits.bin"), bytes).unwrap();
        std::fs::write(
            dir.join("tokens.json"),
            serde_json::to_string(&tokens).unwrap(),
        )
        .unwrap();
        fmoec(
            &["export", "--hf", "hf", "ckpt", "--max-shard-size", "200000"],
            dir,
        )
    }

    fn compare(dir: &Path, arch: &str) {
        let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/compare_logits.py");
        let out = std::process::Command::new(python)
            .arg(script)
            .args(["hf", "tokens.json", "logits.bin", arch])
            .current_dir(dir)
            .output()
            .expect("python runs");
        eprintln!("{}", text(&out));
        assert!(out.status.success(), "{arch}: {}", text(&out));
    }

    fn case(source: String, arch: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let out = export(tmp.path(), &source);
        assert!(out.status.success(), "{}", text(&out));
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(tmp.path().join("hf/model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shards: std::collections::BTreeSet<_> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(shards.len() > 1, "sharded: {shards:?}");
        assert!(tmp.path().join("hf/tokenizer.json").is_file());
        compare(tmp.path(), arch);
        round_trip(tmp.path(), &source);
        // a second export into its own folder is allowed; a foreign file there is not
        let again = fmoec(&["export", "--hf", "hf", "ckpt"], tmp.path());
        assert!(again.status.success(), "{}", text(&again));
        std::fs::write(tmp.path().join("hf/notes.txt"), "mine").unwrap();
        let refused = fmoec(&["export", "--hf", "hf", "ckpt"], tmp.path());
        assert!(
            !refused.status.success() && text(&refused).contains("which fmoec did not write"),
            "{}",
            text(&refused)
        );
    }

    /// A run started from the export (`init = from_hf("hf")`) and saved before its first step
    /// exports the same bytes.
    fn round_trip(dir: &Path, source: &str) {
        let corpus = "To be, or not to be, that is the question:\n".repeat(100);
        std::fs::write(dir.join("corpus.txt"), corpus).unwrap();
        let init = source.replace(
            "    optimizer = adamw(lr = 1e-3)\n",
            "    optimizer = adamw(lr = 1e-3)\n    init = from_hf(\"hf\")\n",
        );
        assert_ne!(init, source);
        // beside the first file's folder: a later export there finds one model file
        std::fs::create_dir_all(dir.join("again")).unwrap();
        std::fs::write(dir.join("again/init.fmoe"), init).unwrap();
        let out = fmoec(
            &[
                "run",
                "again/init.fmoe",
                "--stop-after",
                "0",
                "--out",
                "rt",
                "--quiet",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = fmoec(
            &[
                "export",
                "--hf",
                "hf2",
                "rt/checkpoints",
                "--model",
                "again/init.fmoe",
                "--max-shard-size",
                "200000",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let mut compared = 0;
        for entry in std::fs::read_dir(dir.join("hf")).unwrap() {
            let name = entry.unwrap().file_name();
            if name == "fmoec-export.json" {
                continue; // names the checkpoint and its step
            }
            let (a, b) = (dir.join("hf").join(&name), dir.join("hf2").join(&name));
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{} differs after export -> import -> export",
                name.to_string_lossy()
            );
            compared += 1;
        }
        assert!(compared >= 6, "{compared} files");
    }

    const SWIGLU: &str = "mlp(hidden = 128, act = swiglu)";

    /// A run records its model file in its checkpoints, so `export` finds a model file that is
    /// not beside them (here `models/m.fmoe`, the run's checkpoints in `runs/m/checkpoints`);
    /// once that file is gone, it says so.
    #[test]
    fn export_finds_the_model_file_the_run_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("models")).unwrap();
        let source = model_file(SWIGLU, "", "    bias = false");
        std::fs::write(dir.join("models/m.fmoe"), &source).unwrap();
        std::fs::write(
            dir.join("corpus.txt"),
            "the quick brown fox jumps over the lazy dog. ".repeat(40),
        )
        .unwrap();
        let run = fmoec(
            &[
                "run",
                "models/m.fmoe",
                "--steps",
                "2",
                "--stop-after",
                "1",
                "--quiet",
            ],
            dir,
        );
        assert!(run.status.success(), "{}", text(&run));
        let record =
            fmoec::runtime::checkpoint::run_record(&dir.join("runs/m/checkpoints")).unwrap();
        let recorded = std::path::PathBuf::from(record.model_file.expect("recorded"));
        assert!(recorded.is_absolute(), "{recorded:?}");
        assert_eq!(
            recorded.canonicalize().unwrap(),
            dir.join("models/m.fmoe").canonicalize().unwrap()
        );
        let out = fmoec(&["export", "--hf", "hf", "runs/m/checkpoints"], dir);
        assert!(out.status.success(), "{}", text(&out));
        assert!(dir.join("hf/config.json").is_file());
        std::fs::rename(dir.join("models/m.fmoe"), dir.join("models/moved.fmoe")).unwrap();
        let gone = fmoec(&["export", "--hf", "hf2", "runs/m/checkpoints"], dir);
        assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
        let message = text(&gone);
        assert!(message.contains("the run's model file"), "{message}");
        assert!(
            message.contains("models/m.fmoe` is not there any more"),
            "{message}"
        );
        assert!(message.contains("--model FILE"), "{message}");
        assert!(!dir.join("hf2").exists());
    }

    #[test]
    fn llama_dense_untied() {
        case(
            model_file(SWIGLU, "", "    bias = false\n    tied_embeddings = false"),
            "LlamaForCausalLM",
        );
    }

    #[test]
    fn llama_dense_with_biases() {
        case(
            model_file(SWIGLU, "", "    bias = true"),
            "LlamaForCausalLM",
        );
    }

    #[test]
    fn mixtral_naive_and_noisy() {
        for gate in ["naive()", "noisy()"] {
            let ffn = format!("moe(experts = 4, top_k = 2, gate = {gate}, expert = mlp(hidden = 64, act = swiglu))");
            case(
                model_file(&ffn, "", "    bias = false"),
                "MixtralForCausalLM",
            );
        }
        let ffn =
            "moe(experts = 4, top_k = 2, gate = naive(), expert = mlp(hidden = 64, act = swiglu))";
        case(
            model_file(ffn, "", "    bias = false\n    tied_embeddings = false"),
            "MixtralForCausalLM",
        );
    }

    #[test]
    fn qwen2_moe_shared_experts_dense_first_layer_untied() {
        let layers = "    layers[1..depth].ffn = moe(experts = 8, top_k = 3, gate = naive(), expert = mlp(hidden = 32, act = swiglu),\n        shared = shared_experts(count = 2, expert = mlp(hidden = 32, act = swiglu)))";
        case(
            model_file(
                SWIGLU,
                layers,
                "    bias = false\n    tied_embeddings = false",
            ),
            "Qwen2MoeForCausalLM",
        );
    }

    #[test]
    fn features_without_counterpart_are_refused_where_written() {
        let tmp = tempfile::tempdir().unwrap();
        let source = model_file(
            "mlp(hidden = 128, act = gelu)",
            "    layers[1].ffn = moe(experts = 4, top_k = 2, gate = gshard(), expert = mlp(hidden = 64, act = swiglu))",
            "    bias = false",
        )
        .replace("norm = rmsnorm", "norm = layernorm");
        let out = export(tmp.path(), &source);
        assert!(!out.status.success());
        let t = text(&out);
        for want in [
            "no Hugging Face architecture that fmoec exports has `norm = layernorm`",
            "no Hugging Face architecture that fmoec exports has a gelu MLP",
            "the GShard gate",
            "m.fmoe:",
        ] {
            assert!(t.contains(want), "missing {want:?} in {t}");
        }
        assert!(!tmp.path().join("hf").exists());
    }
}

/// `init = ...` in the train block: the layout table is the runtime's; runs start from fmoec
/// and Hugging Face checkpoints (checked where the file is written before anything runs);
/// sparse upcycling computes the dense model at step 0 where the gates allow it, and says
/// where they do not.
#[cfg(feature = "runtime")]
mod init {
    use super::{fmoec, text};
    use std::path::Path;
    use tch::{Device, Kind, Tensor};

    /// A small Llama-style model of bytes, `ffn` its feed-forward and `init` its start.
    fn model(name: &str, ffn: &str, init: &str) -> String {
        format!(
            "use std.gates.*\n\nmodel {name} {{\n    vocab = 256\n    context = 32\n    width = 64\n    heads = 4\n    kv_heads = 2\n    depth = 2\n    norm = rmsnorm\n    positions = rotary\n    bias = false\n    block = transformer(attention = causal(), ffn = {ffn})\n}}\n\ntrain {{\n    data = builtin(\"shakespeare\")\n    batch = 4 x 32 tokens\n    steps = 2\n    optimizer = adamw(lr = 1e-2)\n{init}}}\n"
        )
    }

    const DENSE: &str = "mlp(hidden = 128, act = swiglu)";

    fn moe(experts: u64, top_k: u64, hidden: u64, gate: &str) -> String {
        format!(
            "moe(experts = {experts}, top_k = {top_k}, gate = {gate}, expert = mlp(hidden = {hidden}, act = swiglu))"
        )
    }

    fn checked(dir: &Path, file: &str) -> fmoec::check::Checked {
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut sources = fmoec::diag::Sources::new();
        let id = sources.add(file, source);
        let mut sink = fmoec::diag::Sink::new();
        fmoec::check::check_file(&mut sources, id, &mut sink).expect("the file checks")
    }

    /// The model of `file` with the parameters of `checkpoint`.
    fn load(dir: &Path, file: &str, checkpoint: &str) -> fmoec::runtime::model::Transformer {
        let checked = checked(dir, file);
        let model = &checked.model;
        let t = {
            let _rng = fmoec::runtime::model::lock_rng();
            fmoec::runtime::model::Transformer::new(model, Device::Cpu, Kind::Float, Kind::Float)
                .unwrap()
        };
        let source =
            fmoec::runtime::checkpoint::Source::open(&dir.join(checkpoint), model).unwrap();
        let all = model
            .moe_layers()
            .map(|(l, m)| (l, (0..m.experts as usize).collect()))
            .collect();
        source.restore(&t.store, None, &all).unwrap();
        t
    }

    fn tokens() -> Tensor {
        let rows: Vec<Vec<i64>> = (0..3)
            .map(|b| (0..24).map(|i| (i * 41 + b * 13 + 7) % 256).collect())
            .collect();
        Tensor::from_slice2(&rows)
    }

    fn logits(t: &fmoec::runtime::model::Transformer) -> Tensor {
        tch::no_grad(|| t.forward(&tokens(), false)).unwrap().logits
    }

    fn relative(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).abs().max().double_value(&[]);
        diff / b.abs().max().double_value(&[])
    }

    fn param(t: &fmoec::runtime::model::Transformer, name: &str) -> Tensor {
        t.store.get(name).unwrap().tensor.detach()
    }

    /// Trains the dense model two steps (so its weights are not the initialisation's) in `dir`.
    fn dense_run(dir: &Path) {
        std::fs::write(dir.join("dense.fmoe"), model("dense", DENSE, "")).unwrap();
        let out = fmoec(&["run", "dense.fmoe", "--quiet"], dir);
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Exports [`dense_run`]'s checkpoint as a Hugging Face folder `hf` in `dir`.
    fn export_dense(dir: &Path) {
        let out = fmoec(
            &[
                "export",
                "--hf",
                "hf",
                "runs/dense/checkpoints",
                "--model",
                "dense.fmoe",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Writes `name.fmoe` and runs it for zero steps: its checkpoint holds what `init` made.
    fn start(dir: &Path, name: &str, ffn: &str, init: &str) -> String {
        std::fs::write(
            dir.join(format!("{name}.fmoe")),
            model(name, ffn, &format!("    init = {init}\n")),
        )
        .unwrap();
        let out = fmoec(
            &[
                "run",
                &format!("{name}.fmoe"),
                "--stop-after",
                "0",
                "--quiet",
            ],
            dir,
        );
        assert!(out.status.success(), "{name}: {}", text(&out));
        text(&out)
    }

    #[test]
    fn the_layout_names_every_parameter_the_runtime_builds() {
        let variants = [
            "norm = layernorm\n    positions = learned\n    bias = true\n    block = transformer(attention = causal(), ffn = mlp(hidden = 96, act = gelu))\n    layers[1].ffn = moe(experts = 4, top_k = 2, gate = gshard(), expert = mlp(hidden = 32, act = relu))",
            "tied_embeddings = false\n    bias = true\n    block = transformer(attention = causal(), ffn = moe(experts = 3, top_k = 2, gate = noisy(), expert = mlp(hidden = 32, act = swiglu), shared = shared_experts(count = 2, expert = mlp(hidden = 16, act = swiglu))))",
            "block = transformer(attention = causal(), ffn = mlp(hidden = 64, act = swiglu))\n    layers[0].ffn = moe(experts = 2, top_k = 1, gate = switch(), expert = mlp(hidden = 16, act = gelu))",
        ];
        for (i, v) in variants.iter().enumerate() {
            let tmp = tempfile::tempdir().unwrap();
            let source = format!(
                "use std.gates.*\n\nmodel m {{\n    vocab = 300\n    context = 16\n    width = 32\n    heads = 4\n    kv_heads = 2\n    depth = 2\n    {v}\n}}\n"
            );
            std::fs::write(tmp.path().join("m.fmoe"), source).unwrap();
            let model = checked(tmp.path(), "m.fmoe").model;
            let t = fmoec::runtime::model::Transformer::new(
                &model,
                Device::Cpu,
                Kind::Float,
                Kind::Float,
            )
            .unwrap();
            let built: Vec<(String, Vec<u64>)> = t
                .store
                .params
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.tensor.size().iter().map(|&n| n as u64).collect(),
                    )
                })
                .collect();
            let listed: Vec<(String, Vec<u64>)> = fmoec::hf::layout::param_shapes(&model)
                .into_iter()
                .map(|p| (p.name, p.shape))
                .collect();
            assert_eq!(built, listed, "variant {i}");
        }
    }

    #[test]
    fn upcycled_models_compute_the_dense_model_at_step_0_where_the_gates_allow() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        dense_run(dir);
        let dense = load(dir, "dense.fmoe", "runs/dense/checkpoints");
        let want = logits(&dense);
        let from_dense = "upcycle(from_checkpoint(\"runs/dense/checkpoints\"))";
        // the same model from another run's checkpoint: the same parameters
        start(
            dir,
            "same",
            DENSE,
            "from_checkpoint(\"runs/dense/checkpoints\")",
        );
        let same = load(dir, "same.fmoe", "runs/same/checkpoints");
        for p in &dense.store.params {
            assert!(p.tensor.equal(&param(&same, &p.name)), "{}", p.name);
        }
        // every expert a copy (G = 1), slices of two (G = 2), of four with a noisy gate (G = 4)
        let equal = [
            ("coarse", moe(4, 2, 128, "naive()"), from_dense.to_string()),
            ("fine", moe(4, 2, 64, "naive()"), from_dense.to_string()),
            ("finer", moe(8, 4, 32, "noisy()"), from_dense.to_string()),
            ("swiped", moe(4, 2, 128, "swipe()"), from_dense.to_string()),
        ];
        for (name, ffn, init) in &equal {
            let said = start(dir, name, ffn, init);
            assert!(
                said.contains("the run starts from upcycled 2 MoE layers"),
                "{said}"
            );
            assert!(!said.contains("W0612"), "{said}");
            let t = load(
                dir,
                &format!("{name}.fmoe"),
                &format!("runs/{name}/checkpoints"),
            );
            let rel = relative(&logits(&t), &want);
            assert!(rel < 1e-5, "{name}: relative difference {rel:e}");
        }
        // the experts themselves: G = 2 makes expert e slice e mod 2, its down projection doubled
        let fine = load(dir, "fine.fmoe", "runs/fine/checkpoints");
        let w1 = param(&dense, "layers.1.ffn.w1");
        let w2 = param(&dense, "layers.1.ffn.w2");
        for e in 0..4i64 {
            let c = e % 2;
            assert!(param(&fine, "layers.1.ffn.experts.w1")
                .select(0, e)
                .equal(&w1.narrow(1, c * 64, 64)));
            assert!(param(&fine, "layers.1.ffn.experts.w2")
                .select(0, e)
                .equal(&(w2.narrow(0, c * 64, 64) * 2.0)));
        }
        let gate = param(&fine, "layers.0.ffn.gate.weight");
        assert!(gate.select(1, 0).equal(&gate.select(1, 1)));
        assert!(!gate.select(1, 0).equal(&gate.select(1, 2)));
        // where it cannot: a top-1 gate over slices of two, a Switch gate (weight = its
        // probability), and noise on purpose
        let unequal = [
            (
                "top1",
                moe(4, 1, 64, "naive()"),
                from_dense.to_string(),
                true,
            ),
            (
                "switched",
                moe(4, 1, 128, "switch()"),
                from_dense.to_string(),
                true,
            ),
            (
                "noisy_copies",
                moe(4, 2, 128, "naive()"),
                "upcycle(from_checkpoint(\"runs/dense/checkpoints\"), noise = 0.05)".to_string(),
                false,
            ),
        ];
        for (name, ffn, init, warned) in &unequal {
            let said = start(dir, name, ffn, init);
            assert_eq!(said.contains("warning[W0612]"), *warned, "{name}: {said}");
            let t = load(
                dir,
                &format!("{name}.fmoe"),
                &format!("runs/{name}/checkpoints"),
            );
            let rel = relative(&logits(&t), &want);
            assert!(rel > 1e-4, "{name}: relative difference {rel:e}");
        }
        let noisy = load(dir, "noisy_copies.fmoe", "runs/noisy_copies/checkpoints");
        // on two ranks, each holding two of the experts: the same experts, noise included
        let out = fmoec(
            &[
                "run",
                "noisy_copies.fmoe",
                "--ranks",
                "2",
                "--stop-after",
                "0",
                "--out",
                "runs/two_ranks",
                "--quiet",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let two = load(dir, "noisy_copies.fmoe", "runs/two_ranks/checkpoints");
        for p in &noisy.store.params {
            assert!(p.tensor.equal(&param(&two, &p.name)), "{}", p.name);
        }
        let w = param(&noisy, "layers.0.ffn.experts.w1");
        assert!(!w.select(0, 0).equal(&w.select(0, 1)));
        let jitter = relative(&w.select(0, 0), &param(&dense, "layers.0.ffn.w1"));
        assert!(jitter > 0.0 && jitter < 0.5, "{jitter}");
    }

    #[test]
    fn hugging_face_checkpoints_start_runs_and_upcycle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        dense_run(dir);
        export_dense(dir);
        let want = logits(&load(dir, "dense.fmoe", "runs/dense/checkpoints"));
        for (name, ffn, init) in [
            ("imported", DENSE.to_string(), "from_hf(\"hf\")"),
            (
                "upcycled",
                moe(4, 2, 64, "naive()"),
                "upcycle(from_hf(\"hf\"))",
            ),
        ] {
            let said = start(dir, name, &ffn, init);
            assert!(said.contains("LlamaForCausalLM `hf`"), "{said}");
            let t = load(
                dir,
                &format!("{name}.fmoe"),
                &format!("runs/{name}/checkpoints"),
            );
            let rel = relative(&logits(&t), &want);
            assert!(rel < 1e-5, "{name}: relative difference {rel:e}");
        }
    }

    #[test]
    fn checkpoints_transformers_saved_start_runs_with_their_logits() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/make_checkpoints.py");
        let out = std::process::Command::new(python)
            .arg(script)
            .arg("made")
            .current_dir(dir)
            .output()
            .expect("python runs");
        assert!(out.status.success(), "{}", text(&out));
        let rows: Vec<Vec<i64>> =
            serde_json::from_slice(&std::fs::read(dir.join("made/tokens.json")).unwrap()).unwrap();
        let tokens = Tensor::from_slice2(&rows);
        let qwen = "mlp(hidden = 96, act = swiglu))\n    layers[1].ffn = moe(experts = 4, top_k = 2, expert = mlp(hidden = 32, act = swiglu), shared = shared_experts(expert = mlp(hidden = 48, act = swiglu))";
        for (name, folder, ffn, tolerance) in [
            ("llama", "llama", "mlp(hidden = 96, act = swiglu)", 1e-4),
            (
                "mixtral",
                "mixtral",
                "moe(experts = 4, top_k = 2, expert = mlp(hidden = 32, act = swiglu))",
                1e-4,
            ),
            ("qwen2_moe", "qwen2_moe", qwen, 1e-4),
            // transformers' shards of the same Llama in bf16: fmoec reads them as fp32
            (
                "llama_bf16",
                "llama",
                "mlp(hidden = 96, act = swiglu)",
                2e-2,
            ),
        ] {
            let source = model(name, ffn, &format!("    init = from_hf(\"made/{name}\")\n"))
                .replace(
                    "    bias = false\n",
                    "    bias = false\n    tied_embeddings = false\n",
                );
            std::fs::write(dir.join(format!("{name}.fmoe")), source).unwrap();
            let out = fmoec(&["check", &format!("{name}.fmoe")], dir);
            assert!(out.status.success(), "{name}: {}", text(&out));
            assert!(
                !text(&out).contains("warning[W06"),
                "{name}: {}",
                text(&out)
            );
            let out = fmoec(
                &[
                    "run",
                    &format!("{name}.fmoe"),
                    "--stop-after",
                    "0",
                    "--quiet",
                ],
                dir,
            );
            assert!(out.status.success(), "{name}: {}", text(&out));
            let t = load(
                dir,
                &format!("{name}.fmoe"),
                &format!("runs/{name}/checkpoints"),
            );
            let got = tch::no_grad(|| t.forward(&tokens, false)).unwrap().logits;
            let bytes = std::fs::read(dir.join(format!("made/{folder}.logits"))).unwrap();
            let want: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let want = Tensor::from_slice(&want).view_(got.size());
            let rel = relative(&got, &want);
            assert!(rel < tolerance, "{name}: relative difference {rel:e}");
            eprintln!(
                "{name}: transformers' checkpoint, fmoec's logits: relative difference {rel:e}"
            );
        }
    }

    /// `fmoec check` output of `source` written as `name.fmoe` in `dir`.
    fn check(dir: &Path, name: &str, source: &str) -> (bool, String) {
        std::fs::write(dir.join(format!("{name}.fmoe")), source).unwrap();
        let out = fmoec(&["check", &format!("{name}.fmoe")], dir);
        (out.status.success(), text(&out))
    }

    #[test]
    fn sources_that_do_not_fit_are_refused_where_the_file_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        dense_run(dir);
        start(
            dir,
            "coarse",
            &moe(4, 2, 128, "naive()"),
            "upcycle(from_checkpoint(\"runs/dense/checkpoints\"))",
        );
        let cases = [
            (
                "narrow",
                model("narrow", DENSE, "    init = from_checkpoint(\"runs/dense/checkpoints\")\n")
                    .replace("width = 64", "width = 32"),
                vec!["error[E0612]: the model has width = 32, the checkpoint to start from has 64", "narrow.fmoe:6:13", "its `embed.tokens` is [256, 64]"],
            ),
            (
                "odd_hidden",
                model("odd_hidden", &moe(4, 2, 96, "naive()"), "    init = upcycle(from_checkpoint(\"runs/dense/checkpoints\"))\n"),
                vec!["error[E0614]: the experts' hidden size 96 does not divide the dense MLP's 128 (layers 0 and 1)", "help: use hidden = 128"],
            ),
            (
                "three",
                model("three", &moe(3, 2, 64, "naive()"), "    init = upcycle(from_checkpoint(\"runs/dense/checkpoints\"))\n"),
                vec!["error[E0614]: 3 experts cannot hold whole copies of the dense MLP cut into 2 slices (layers 0 and 1)"],
            ),
            (
                "twice",
                model("twice", &moe(8, 2, 128, "naive()"), "    init = upcycle(from_checkpoint(\"runs/coarse/checkpoints\"))\n"),
                vec!["error[E0614]: upcycle starts from a dense model; layer 0 of the checkpoint is an MoE layer"],
            ),
            (
                "gelu_experts",
                model("gelu_experts", "moe(experts = 4, top_k = 2, expert = mlp(hidden = 128, act = gelu))", "    init = upcycle(from_checkpoint(\"runs/dense/checkpoints\"))\n"),
                vec!["error[E0614]: the experts are GELU or ReLU, the checkpoint's layer 0 MLP is SwiGLU"],
            ),
            (
                "more_experts",
                model("more_experts", &moe(8, 2, 128, "naive()"), "    init = from_checkpoint(\"runs/coarse/checkpoints\")\n"),
                vec!["error[E0612]: the model has experts = 8, the checkpoint to start from has 4", "its `layers.0.ffn.experts.w1` is [4, 64, 128]"],
            ),
            (
                "moe_direct",
                model("moe_direct", &moe(4, 2, 128, "naive()"), "    init = from_checkpoint(\"runs/dense/checkpoints\")\n"),
                vec!["error[E0612]: layer 0 is an MoE layer here, a dense MLP in the checkpoint to start from", "error[E0612]: layer 1 is an MoE layer here", "help: to start MoE layers from a dense model's MLPs, write `init = upcycle(from_checkpoint(...))`"],
            ),
        ];
        for (name, source, wants) in &cases {
            let (ok, said) = check(dir, name, source);
            assert!(!ok, "{name}: {said}");
            for want in wants {
                assert!(said.contains(want), "{name}: missing {want:?} in\n{said}");
            }
            // `fmoec run` refuses it the same way, before it writes anything
            let out = fmoec(&["run", &format!("{name}.fmoe"), "--quiet"], dir);
            assert!(!out.status.success(), "{name}");
            assert!(!dir.join("runs").join(name).exists(), "{name}");
        }
        // a truncated Hugging Face shard, found from its header
        export_dense(dir);
        let shard = dir.join("hf/model-00001-of-00001.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
        let (ok, said) = check(
            dir,
            "cut",
            &model("cut", DENSE, "    init = from_hf(\"hf\")\n"),
        );
        assert!(
            !ok && said.contains("error[E0611]: cannot read the Hugging Face checkpoint's weights")
                && said.contains("is truncated")
                && said.contains(&format!("({} bytes in the file)", bytes.len() - 100)),
            "{said}"
        );
        // not there: `fmoec check` warns, `fmoec run` refuses and writes nothing
        let (ok, said) = check(
            dir,
            "gone",
            &model("gone", DENSE, "    init = from_hf(\"elsewhere\")\n"),
        );
        assert!(
            ok && said
                .contains("warning[W0611]: the checkpoint to start from, `elsewhere`, is not here"),
            "{said}"
        );
        let out = fmoec(&["run", "gone.fmoe", "--quiet"], dir);
        assert!(
            !out.status.success() && text(&out).contains("`elsewhere`, is not here"),
            "{}",
            text(&out)
        );
        assert!(!dir.join("runs/gone").exists());
    }

    #[test]
    fn weights_the_model_file_cannot_compute_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let biased = model("biased", DENSE, "").replace("bias = false", "bias = true");
        std::fs::write(dir.join("biased.fmoe"), &biased).unwrap();
        let out = fmoec(&["run", "biased.fmoe", "--quiet"], dir);
        assert!(out.status.success(), "{}", text(&out));
        let out = fmoec(
            &[
                "export",
                "--hf",
                "hf",
                "runs/biased/checkpoints",
                "--model",
                "biased.fmoe",
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        // transformers' Llama has an up-projection bias; fmoec's SwiGLU has none
        let shard = dir.join("hf/model-00001-of-00001.safetensors");
        let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&shard)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let t = if n == "model.layers.1.mlp.up_proj.bias" {
                    t + 0.5
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        Tensor::write_safetensors(&named, &shard).unwrap();
        let again = biased
            .replace("model biased", "model again")
            .replace("    optimizer", "    init = from_hf(\"hf\")\n    optimizer");
        std::fs::write(dir.join("again.fmoe"), again).unwrap();
        let out = fmoec(&["run", "again.fmoe", "--quiet"], dir);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains(
                "`model.layers.1.mlp.up_proj.bias` of the Hugging Face checkpoint is not zero"
            ),
            "{said}"
        );
        assert!(!dir.join("runs/again").exists());
    }

    /// A checkpoint holding NaN is refused at the start, naming the tensor, instead of
    /// training into "the loss became NaN at step 1; lower the learning rate".
    #[test]
    fn weights_that_are_not_finite_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        dense_run(dir);
        export_dense(dir);
        let shard = dir.join("hf/model-00001-of-00001.safetensors");
        let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&shard)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let t = if n == "model.layers.0.mlp.down_proj.weight" {
                    t * f64::NAN
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        Tensor::write_safetensors(&named, &shard).unwrap();
        std::fs::write(
            dir.join("nan.fmoe"),
            model("nan", DENSE, "    init = from_hf(\"hf\")\n"),
        )
        .unwrap();
        let out = fmoec(&["run", "nan.fmoe", "--quiet"], dir);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains("`layers.0.ffn.w2` from the checkpoint to start from (`hf`) holds NaN"),
            "{said}"
        );
        assert!(!dir.join("runs/nan").exists());
    }
}

/// The path of the README's "whole path" section, with tiny sizes: a JSON-lines corpus ->
/// `fmoec tokenizer train` -> `fmoec data` -> `fmoec run` of a Mixtral-style model ->
/// `fmoec export --hf` -> transformers' logits equal fmoec's -> a dense run -> an MoE run
/// upcycled from its checkpoint, whose first loss is the dense model's on the same batch.
#[cfg(feature = "runtime")]
mod whole_path {
    use super::{fmoec, golden, text};
    use std::path::Path;
    use tch::{Device, Kind, Tensor};

    fn ok(args: &[&str], dir: &Path) -> String {
        let out = fmoec(args, dir);
        assert!(out.status.success(), "fmoec {args:?}: {}", text(&out));
        text(&out)
    }

    fn model_file(name: &str, ffn: &str, init: &str) -> String {
        format!(
            "model {name} {{\n    vocab = 512\n    context = 32\n    width = 64\n    heads = 4\n    kv_heads = 2\n    depth = 2\n    norm = rmsnorm\n    positions = rotary\n    bias = false\n    block = transformer(attention = causal(), ffn = {ffn})\n}}\n\ntrain {{\n    data = megatron(\"data/corpus_text_document\")\n    tokenizer = hf(\"tok/tokenizer.json\")\n    batch = 4 x 32 tokens\n    steps = 3\n    optimizer = adamw(lr = 3e-3)\n{init}}}\n"
        )
    }

    fn first_loss(dir: &Path, run: &str) -> f64 {
        let metrics =
            std::fs::read_to_string(dir.join("runs").join(run).join("metrics.jsonl")).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        first["loss"].as_f64().unwrap()
    }

    #[test]
    fn corpus_to_transformers_and_an_upcycled_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::copy(golden().join("corpus.jsonl"), dir.join("corpus.jsonl")).unwrap();
        ok(
            &[
                "tokenizer",
                "train",
                "corpus.jsonl",
                "--vocab-size",
                "512",
                "-o",
                "tok",
            ],
            dir,
        );
        ok(
            &[
                "data",
                "--input",
                "corpus.jsonl",
                "--tokenizer",
                "tok/tokenizer.json",
                "--append-eod",
                "--output-prefix",
                "data/corpus",
            ],
            dir,
        );
        let moe = "moe(experts = 4, top_k = 2, expert = mlp(hidden = 64, act = swiglu))";
        std::fs::write(dir.join("mixtral.fmoe"), model_file("mixtral", moe, "")).unwrap();
        ok(&["run", "mixtral.fmoe", "--quiet"], dir);
        let said = ok(
            &[
                "export",
                "--hf",
                "hf/mixtral",
                "runs/mixtral/checkpoints",
                "--model",
                "mixtral.fmoe",
            ],
            dir,
        );
        assert!(said.contains("MixtralForCausalLM"), "{said}");

        // fmoec's logits from the trained checkpoint, then transformers' from the export
        // (the model alone: the train block's paths are relative to `dir`)
        let source = model_file("mixtral", moe, "");
        let model_only = source.split("train {").next().unwrap().to_string();
        let mut sources = fmoec::diag::Sources::new();
        let id = sources.add("mixtral.fmoe", model_only);
        let mut sink = fmoec::diag::Sink::new();
        let checked = fmoec::check::check_file(&mut sources, id, &mut sink).unwrap();
        let model = &checked.model;
        let t = {
            let _rng = fmoec::runtime::model::lock_rng();
            fmoec::runtime::model::Transformer::new(model, Device::Cpu, Kind::Float, Kind::Float)
                .unwrap()
        };
        let checkpoint =
            fmoec::runtime::checkpoint::Source::open(&dir.join("runs/mixtral/checkpoints"), model)
                .unwrap();
        let all = model
            .moe_layers()
            .map(|(l, m)| (l, (0..m.experts as usize).collect()))
            .collect();
        checkpoint.restore(&t.store, None, &all).unwrap();
        let tokens: Vec<Vec<i64>> = (0..2)
            .map(|b| (0..20).map(|i| (i * 29 + b * 7 + 3) % 512).collect())
            .collect();
        let logits = tch::no_grad(|| t.forward(&Tensor::from_slice2(&tokens), false))
            .unwrap()
            .logits
            .contiguous();
        let mut bytes = vec![0u8; logits.numel() * 4];
        logits.copy_data_u8(&mut bytes, logits.numel());
        std::fs::write(dir.join("logits.bin"), bytes).unwrap();
        std::fs::write(
            dir.join("tokens.json"),
            serde_json::to_string(&tokens).unwrap(),
        )
        .unwrap();
        let python = std::env::var("FMOEC_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/compare_logits.py");
        let out = std::process::Command::new(python)
            .arg(script)
            .args([
                "hf/mixtral",
                "tokens.json",
                "logits.bin",
                "MixtralForCausalLM",
            ])
            .current_dir(dir)
            .output()
            .expect("python runs");
        assert!(out.status.success(), "{}", text(&out));

        // a dense model, and an MoE model upcycled from it (two slices per dense MLP)
        let dense = "mlp(hidden = 128, act = swiglu)";
        std::fs::write(dir.join("dense.fmoe"), model_file("dense", dense, "")).unwrap();
        ok(&["run", "dense.fmoe", "--quiet"], dir);
        let from = "from_checkpoint(\"runs/dense/checkpoints\")";
        std::fs::write(
            dir.join("upcycled.fmoe"),
            model_file("upcycled", moe, &format!("    init = upcycle({from})\n")),
        )
        .unwrap();
        ok(&["check", "upcycled.fmoe"], dir);
        let said = ok(&["run", "upcycled.fmoe", "--quiet"], dir);
        assert!(
            said.contains("the run starts from upcycled 2 MoE layers"),
            "{said}"
        );
        // the same dense parameters, not upcycled, see the same first batch
        std::fs::write(
            dir.join("continued.fmoe"),
            model_file("continued", dense, &format!("    init = {from}\n")),
        )
        .unwrap();
        ok(&["run", "continued.fmoe", "--quiet"], dir);
        let (up, dense) = (first_loss(dir, "upcycled"), first_loss(dir, "continued"));
        assert!((up - dense).abs() < 1e-5 * dense, "{up} vs {dense}");
    }
}
