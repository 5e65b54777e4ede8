//! Surge's deterministic simulator: every node of the topology in one
//! thread, a seeded world that breaks things on purpose, and checkers that
//! prove the invariants of DESIGN.md after each run. `main.rs` is the CLI;
//! [`sim::run`] runs one seed.

pub mod checkers;
pub mod clock;
pub mod disk;
pub mod faults;
pub mod net;
pub mod region;
pub mod sim;
pub mod trace;
pub mod workload;
pub mod world;
