//! The redb tables of one Raft group's database, and the two kinds of write transaction.
//!
//! Values are always bytes written by [`crate::codec`], so the table types never change
//! when a stored type does; the codec's version byte carries that instead.

use redb::Database;
use redb::Durability;
use redb::TableDefinition;
use redb::WriteTransaction;

use crate::StoreError;

/// Raft log entries by log index. A `u64` key sorts numerically in redb, so ranges,
/// `first` and `last` follow log order.
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");

/// The log store's small records (vote, committed, last purged), one key each.
pub(crate) const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");

/// The current snapshot: its metadata and its data under two keys, written in one
/// transaction so they always match.
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_snapshot");

/// `LOG_META` key of the last saved vote.
pub(crate) const KEY_VOTE: &str = "vote";
/// `LOG_META` key of the last saved committed log id.
pub(crate) const KEY_COMMITTED: &str = "committed";
/// `LOG_META` key of the last purged log id.
pub(crate) const KEY_LAST_PURGED: &str = "last_purged_log_id";
/// `SNAPSHOT` key of the current snapshot's `SnapshotMeta`.
pub(crate) const KEY_SNAPSHOT_META: &str = "meta";
/// `SNAPSHOT` key of the current snapshot's data (the encoded `GroupState`).
pub(crate) const KEY_SNAPSHOT_DATA: &str = "data";

/// Creates every table, so that read transactions never meet a missing table (redb's
/// read transactions cannot create one and would fail with `TableDoesNotExist`).
pub(crate) fn create_tables(db: &Database) -> Result<(), StoreError> {
    let txn = begin_durable_write(db)?;
    txn.open_table(LOG)?;
    txn.open_table(LOG_META)?;
    txn.open_table(SNAPSHOT)?;
    txn.commit()?;
    Ok(())
}

/// Begins a write transaction whose `commit` returns only after the data is fsynced.
///
/// redb 4 already defaults to `Durability::Immediate`; it is set explicitly because the
/// correctness of Raft (an acknowledged append survives a crash) depends on it, and a
/// changed default must not silently weaken that.
pub(crate) fn begin_durable_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    Ok(txn)
}

/// Begins a write transaction that is not fsynced on commit.
///
/// The commit is visible at once and becomes durable with the next durable commit (redb
/// orders commits), or is lost in a crash before that. Only for records whose loss after
/// a crash is harmless.
pub(crate) fn begin_lazy_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::None)?;
    Ok(txn)
}
