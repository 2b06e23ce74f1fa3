//! Real data in: tokenizers (a Hugging Face `tokenizer.json`, or GPT-2's `vocab.json` +
//! `merges.txt`), Megatron-LM's indexed dataset format (`.bin`/`.idx`), `fmoec data` (the
//! preprocessor that writes it byte for byte as Megatron's `tools/preprocess_data.py` does,
//! on all cores), `fmoec tokenizer train`, and the embedded corpus.
//!
//! None of it needs libtorch, so it is part of the compiler-only build
//! (`--no-default-features`): users who only check, plan and emit Megatron trainings
//! preprocess their corpus for Megatron with it, and the checker reads tokenizers to know
//! their vocabulary. Knows nothing about models, plans or the runtime.

pub mod byte_level;
pub mod cli;
pub mod corpus;
pub mod indexed;
pub mod preprocess;
pub mod tokenizer;
pub mod train;
