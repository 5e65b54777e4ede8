//! Multi-process tests: real `surge` processes on loopback, driven through
//! the public API and killed for real. One test binary, a module per feature.

mod dr_replication;
mod failover;
mod kill_restart;
mod public_tls;
mod replace_node;
mod support;
mod switchover;
mod zone_loss;
