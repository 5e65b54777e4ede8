//! Errors of the redb store, and their translation into openraft's `StorageError`.

use openraft::StorageError;
use openraft::StorageIOError;

use crate::codec::CodecError;

/// What went wrong inside the redb store.
///
/// The store's own functions return this; at the openraft trait boundary it becomes a
/// [`StorageError`] whose subject (logs, vote, snapshot, ...) says which operation failed.
/// One variant per redb error type, so `?` works without a catch-all conversion.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be created or opened.
    #[error("open redb database")]
    Open(#[from] redb::DatabaseError),

    /// A read or write transaction could not begin.
    #[error("begin redb transaction")]
    Transaction(#[from] redb::TransactionError),

    /// A table could not be opened in a transaction.
    #[error("open redb table")]
    Table(#[from] redb::TableError),

    /// A read or write inside a transaction failed (IO error, corruption, ...).
    #[error("access redb table")]
    Access(#[from] redb::StorageError),

    /// The durability of a write transaction could not be set.
    #[error("set redb durability")]
    Durability(#[from] redb::SetDurabilityError),

    /// A write transaction could not commit; its writes are not on disk.
    #[error("commit redb transaction")]
    Commit(#[from] redb::CommitError),

    /// A stored value could not be encoded or decoded.
    #[error("encode or decode stored value")]
    Codec(#[from] CodecError),

    /// A stored record contradicts itself, e.g. a log entry stored under another index
    /// than its own. Raised by the assertions on read, so corruption stops the node
    /// instead of feeding Raft wrong data.
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
}

/// Turns a [`StoreError`] into openraft's [`StorageError`] with the subject and verb that
/// `describe` picks (one of the [`StorageIOError`] helpers such as `write_logs`).
pub(crate) fn to_storage_error(
    describe: impl FnOnce(openraft::AnyError) -> StorageIOError<u64>,
) -> impl FnOnce(StoreError) -> StorageError<u64> {
    // Not logged here: openraft logs the error where it handles it (by stopping the node).
    move |error| StorageError::IO { source: describe(openraft::AnyError::new(&error)) }
}
