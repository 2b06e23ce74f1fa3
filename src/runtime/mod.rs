//! `runtime`: the built-in trainer on libtorch (tch).
pub mod cli;
