//! `settings`: `fmoec.toml`, what the model file does not say (where to run, where to
//! write, which Megatron-LM checkout to test against).
