//! Raft log and state-machine persistence for Surge, on redb.
//!
//! One Raft group's storage is one redb database file holding its log, vote, log
//! pointers and latest snapshot. [`open`] returns the two halves openraft's `storage-v2`
//! API wants: a [`LogStore`] (`RaftLogStorage`) and a [`StateMachineStore`]
//! (`RaftStateMachine`), sharing the database.
//!
//! Durability in one paragraph: log appends, votes, truncations, purges and snapshots are
//! fsynced before openraft is told they happened; the applied state lives in memory and
//! is rebuilt on restart from the latest snapshot plus the log after it (see
//! [`StateMachineStore`] for why that is safe).
//!
//! **Architecture invariant:** storage knows the domain only as `GroupState::apply` and
//! `check_invariants`, and knows nothing of the network, actors or HTTP. Every byte it
//! writes goes through [`codec`].
//!
//! The stores are generic over the Raft type config ([`SurgeTypeConfig`]) so the
//! deterministic simulator can plug in its own `AsyncRuntime`; production uses
//! [`TypeConfig`]. Redb calls are blocking and made inline (they are short): no extra
//! threads, so the simulator stays single-threaded and deterministic.

// Every public item says why it exists (STYLE.md); the compiler keeps it that way.
#![warn(missing_docs)]

pub mod codec;
mod error;
mod log_store;
pub mod runtime;
mod schema;
mod state_machine;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use openraft::BasicNode;
use openraft::RaftTypeConfig;
use redb::Database;

pub use crate::error::StoreError;
pub use crate::log_store::AppendTimes;
pub use crate::log_store::LogStore;
pub use crate::log_store::WriteDelay;
pub use crate::state_machine::SnapshotBuilder;
pub use crate::state_machine::StateMachineStore;
pub use crate::state_machine::StateReader;

openraft::declare_raft_types!(
    /// The Raft type config of a Surge group: domain requests and responses, tokio with a
    /// seedable generator ([`runtime::SurgeRuntime`], so the simulator replays elections),
    /// openraft's defaults (`u64` node ids, `BasicNode`) otherwise.
    pub TypeConfig:
        D = domain::Request,
        R = domain::Response,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::SurgeRuntime,
);

/// Any Raft type config whose data the stores can persist: Surge's request and response,
/// `u64` node ids, `BasicNode`, openraft's `Entry` and in-memory snapshot data.
///
/// It exists so that the async runtime (and responder) stay free: production uses
/// [`TypeConfig`], the deterministic simulator a config with a seeded runtime. Implemented
/// for every such config; nothing needs to implement it by hand.
pub trait SurgeTypeConfig:
    RaftTypeConfig<
    D = domain::Request,
    R = domain::Response,
    NodeId = u64,
    Node = BasicNode,
    Entry = openraft::Entry<Self>,
    SnapshotData = Cursor<Vec<u8>>,
>
{
}

impl<C> SurgeTypeConfig for C where
    C: RaftTypeConfig<
        D = domain::Request,
        R = domain::Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<C>,
        SnapshotData = Cursor<Vec<u8>>,
    >
{
}

/// Opens (creating if absent) the database file of one Raft group at `path` and returns
/// its log store and its state machine, restored from the latest snapshot.
///
/// # Errors
///
/// The file cannot be opened or created as a redb database (not a database, locked by
/// another process, IO error), or its current snapshot cannot be read or decoded.
pub fn open<C: SurgeTypeConfig>(path: &Path) -> Result<(LogStore<C>, StateMachineStore<C>), StoreError> {
    from_database(Arc::new(Database::create(path)?))
}

/// Like [`open`], for a database the caller built, e.g. with `redb::Builder` and a custom
/// `redb::StorageBackend` (an in-memory backend in tests, a fault-injecting one in the
/// simulator).
///
/// # Errors
///
/// The tables cannot be created, or the current snapshot cannot be read or decoded.
pub fn from_database<C: SurgeTypeConfig>(db: Arc<Database>) -> Result<(LogStore<C>, StateMachineStore<C>), StoreError> {
    schema::create_tables(&db)?;
    let state_machine = StateMachineStore::load(db.clone())?;
    Ok((LogStore::new(db), state_machine))
}
