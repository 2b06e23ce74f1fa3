//! `plan`: the ParallelPlan (rank grid, process groups, expert placement, memory,
//! traffic, time) computed from the ModelGraph and the `parallel` block.
pub mod cli;
