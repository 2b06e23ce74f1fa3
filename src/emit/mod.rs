//! `emit`: the Megatron-LM patch, generated Python module and launch script.
pub mod cli;
