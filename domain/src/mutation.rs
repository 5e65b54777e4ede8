//! Known bugs, for proving that the simulator's checkers catch them.
//!
//! Each [`Mutation`] is a bug Surge must never have: skipping the stock
//! check, applying a retried checkout or restock twice, acknowledging a log append
//! before it is fsynced, a deposed leader acknowledging writes, a leader
//! selling escrow the DR copy never confirmed, an old primary that ignores
//! the generation fence, a node with a lost disk taken back in place. The code
//! paths that would have the bug ask [`active`] first. The simulator's
//! mutation test switches them on one at a time and expects a failing seed
//! within a bounded number of runs.
//!
//! Only the `mutations` feature (enabled by the `simulations` crate alone)
//! compiles the switch in; otherwise [`active`] is a constant `false` and
//! every check folds away. Even with the feature, nothing but the simulator
//! ever calls [`activate`].

/// A bug the simulator must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutation {
    /// A checkout reserves units without checking that enough are available.
    SkipStockCheck = 1,
    /// A retried checkout or restock is applied again instead of answered
    /// from its key.
    ApplyRetryTwice = 2,
    /// Log appends are acknowledged before they are fsynced.
    AckBeforeFsync = 3,
    /// A leader cut off from its quorum answers writes from its own state.
    DeposedLeaderAcks = 4,
    /// The leader confirms its own escrow grants instead of waiting for
    /// the DR copy to confirm it has them.
    ConfirmUnheardEscrow = 5,
    /// A node ignores the fence on itself: an old primary that returns
    /// after a forced failover leads writes without asking the DR region
    /// first, and goes on when it hears it is fenced.
    IgnoreFence = 6,
    /// A node whose disk was lost is taken back in place: the replacement
    /// adds it back without removing it first, so its leader takes the
    /// empty log for the one the node had acknowledged.
    ReplaceInPlace = 7,
}

impl Mutation {
    /// Every mutation, for the test that tries them all.
    pub const ALL: [Mutation; 7] = [
        Mutation::SkipStockCheck,
        Mutation::ApplyRetryTwice,
        Mutation::AckBeforeFsync,
        Mutation::DeposedLeaderAcks,
        Mutation::ConfirmUnheardEscrow,
        Mutation::IgnoreFence,
        Mutation::ReplaceInPlace,
    ];

    /// Its name on the simulator's command line.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::SkipStockCheck => "skip-stock-check",
            Mutation::ApplyRetryTwice => "apply-retry-twice",
            Mutation::AckBeforeFsync => "ack-before-fsync",
            Mutation::DeposedLeaderAcks => "deposed-leader-acks",
            Mutation::ConfirmUnheardEscrow => "confirm-unheard-escrow",
            Mutation::IgnoreFence => "ignore-fence",
            Mutation::ReplaceInPlace => "replace-in-place",
        }
    }

    /// The mutation called `name`.
    pub fn named(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutations")]
mod switch {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::Mutation;

    static ACTIVE: AtomicU8 = AtomicU8::new(0);

    /// Switches `mutation` on (and every other off); `None` switches all off.
    pub fn activate(mutation: Option<Mutation>) {
        ACTIVE.store(mutation.map_or(0, |m| m as u8), Ordering::SeqCst);
    }

    /// Whether `mutation` is on.
    pub fn active(mutation: Mutation) -> bool {
        ACTIVE.load(Ordering::Relaxed) == mutation as u8
    }
}

#[cfg(feature = "mutations")]
pub use switch::{activate, active};

/// Whether `mutation` is on: never, without the `mutations` feature.
#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn active(_mutation: Mutation) -> bool {
    false
}
