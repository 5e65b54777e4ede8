//! Surge's pure state machines: sales, stock, sessions, carts and orders.
//!
//! **Architecture invariant:** this crate does no IO and knows nothing about
//! actix, tokio, openraft, HTTP or the clock. Time arrives inside each
//! [`Request`] as the timestamp the Raft leader stamped on it, so every replica
//! that applies the same log reaches the same state, and the simulator can run
//! this exact code under a seeded world.
//!
//! One Raft group's whole replicated state is a [`GroupState`]. A log entry is a
//! [`Request`]: a batch of [`Command`]s (group commit), applied in order, each
//! answered by one [`Outcome`]. A sold-out SKU or an exceeded limit is a normal
//! outcome ([`Outcome::Rejected`]), not an error.

mod limits;
pub mod mutation;
mod state;
mod stock;
mod types;

pub use limits::*;
pub use state::GroupState;
pub use stock::Stock;
pub use types::*;
