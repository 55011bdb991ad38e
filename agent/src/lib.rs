//! allocwatch as a library: every module of the tool. The binary (`main.rs`) is the wiring; the
//! fuzz targets (`fuzz/`) call the parsers of outside data directly.

// Every stderr line goes through `say!` (whole lines beside a traced program's own output).
#![cfg_attr(not(test), deny(clippy::print_stderr))]

pub mod aggregate;
#[cfg(test)]
mod bench;
pub mod cli;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod frames;
pub mod goagg;
pub mod gort;
pub mod gostate;
pub mod k8s;
pub mod launch;
pub mod loss;
pub mod model;
pub mod pipeline;
pub mod preflight;
pub mod privilege;
pub mod probe_log;
#[cfg(test)]
mod probe_tests;
pub mod probes;
pub mod procfs;
pub mod report;
pub mod say;
pub mod serve;
pub mod session;
pub mod slots;
pub mod symbolize;
pub mod target;
pub mod unwind;
pub mod values;
