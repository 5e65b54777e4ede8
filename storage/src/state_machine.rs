//! The replicated state of one group (`domain::GroupState`) and its snapshots in redb.

use std::fmt;
use std::fmt::Debug;
use std::io::Cursor;
use std::sync::{Arc, RwLock, RwLockWriteGuard};

use domain::GroupState;
use domain::Response;
use openraft::storage::RaftStateMachine;
use openraft::BasicNode;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::SnapshotMeta;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::StoredMembership;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;

use crate::codec;
use crate::error::to_storage_error;
use crate::schema;
use crate::StoreError;
use crate::SurgeTypeConfig;

/// Everything `apply` changes, as one value so a snapshot builder can copy it at once.
#[derive(Clone, Debug, Default)]
struct MachineState {
    /// The last log entry applied to `group`; `None` before the first one.
    last_applied: Option<LogId<u64>>,
    /// The last membership config applied; openraft reads it back on restart.
    last_membership: StoredMembership<u64, BasicNode>,
    /// The group's business state (stock, sessions, orders, ...).
    group: GroupState,
}

/// The state machine of one group: `domain::GroupState` in memory, snapshots in redb.
///
/// # Persistence: durable snapshots, volatile applied state
///
/// `apply` changes only memory. What is durable is the latest snapshot (the encoded
/// `GroupState` plus its `SnapshotMeta`), written with fsync before `build_snapshot` or
/// `install_snapshot` returns. On restart, the store is rebuilt from that
/// snapshot and reports the snapshot's `last_log_id` as `last_applied`; openraft then
/// re-applies the committed log entries after it (up to the saved committed id at once,
/// the rest as the leader reports commits). Nothing is lost because:
///
/// - every entry after the snapshot is still in the log: openraft purges only entries
///   covered by the current snapshot (`purge_upto <= snapshot.last_log_id`), and the
///   snapshot is on disk before openraft learns of it;
/// - `GroupState::apply` is deterministic, so replaying an entry gives the state and
///   outcome it gave the first time.
///
/// Fsyncing the state per entry would add an fsync to every commit for no gain in safety.
/// The price is replay time on restart, bounded by the snapshot policy the node configures.
pub struct StateMachineStore<C> {
    /// The group's database, shared with its [`crate::LogStore`].
    db: Arc<Database>,
    /// The last log entry applied; `None` before the first one.
    last_applied: Option<LogId<u64>>,
    /// The last membership config applied; openraft reads it back on restart.
    last_membership: StoredMembership<u64, BasicNode>,
    /// The group's business state. Openraft's state-machine task is its only
    /// writer; the node reads it through a [`StateReader`] clone.
    group: StateReader,
    /// Counts snapshots built by this process, to make snapshot ids unique even when two
    /// snapshots cover the same log id. Deterministic, unlike a clock or random id.
    snapshots_built: u64,
    /// Ties the store to one Raft type config without storing a value of it.
    _config: std::marker::PhantomData<C>,
}

impl<C> Debug for StateMachineStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &self.last_applied)
            .field("last_membership", &self.last_membership)
            .finish_non_exhaustive()
    }
}

/// A read handle on a group's applied state, shared by the state machine (the
/// only writer, once per batch of applied entries) and the node's readers.
/// Reads are short closures, so the lock is never held across an await.
#[derive(Clone, Debug, Default)]
pub struct StateReader(Arc<RwLock<Applied>>);

/// The applied state and the index of the last entry in it, changed together.
#[derive(Debug, Default)]
struct Applied {
    state: GroupState,
    index: u64,
}

impl StateReader {
    /// Runs `read` on the state as applied so far.
    pub fn read<T>(&self, read: impl FnOnce(&GroupState) -> T) -> T {
        read(&self.0.read().expect("group state lock poisoned").state)
    }

    /// Runs `read` on the state as applied so far, and says up to which
    /// log index that is.
    pub fn read_at<T>(&self, read: impl FnOnce(&GroupState) -> T) -> (T, u64) {
        let applied = self.0.read().expect("group state lock poisoned");
        (read(&applied.state), applied.index)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.0.write().expect("group state lock poisoned")
    }
}

impl<C: SurgeTypeConfig> StateMachineStore<C> {
    /// Restores the state machine from the database's current snapshot, or starts empty
    /// when there is none.
    pub(crate) fn load(db: Arc<Database>) -> Result<Self, StoreError> {
        let applied = match read_snapshot(&db)? {
            Some(StoredSnapshot { meta, data }) => MachineState {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership,
                group: decode_group(&data)?,
            },
            None => MachineState::default(),
        };
        Ok(Self {
            db,
            last_applied: applied.last_applied,
            last_membership: applied.last_membership,
            group: StateReader(Arc::new(RwLock::new(Applied {
                index: applied.last_applied.map_or(0, |id| id.index),
                state: applied.group,
            }))),
            snapshots_built: 0,
            _config: std::marker::PhantomData,
        })
    }

    /// A handle on the group's applied state, for reads served by this replica.
    /// It stays valid after the store is handed to openraft.
    #[must_use]
    pub fn reader(&self) -> StateReader {
        self.group.clone()
    }

    /// Applies entries in order and returns one response per entry.
    fn apply_entries(&mut self, entries: impl Iterator<Item = C::Entry>) -> Vec<Response> {
        let mut responses = Vec::with_capacity(entries.size_hint().0);
        let mut applied = self.group.write();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            applied.index = entry.log_id.index;
            let response = match entry.payload {
                EntryPayload::Normal(request) => applied.state.apply(&request),
                // Blank entries (a new leader's first entry) change nothing.
                EntryPayload::Blank => Response::default(),
                EntryPayload::Membership(membership) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::default()
                }
            };
            responses.push(response);
        }
        responses
    }

    /// Replaces the state with a snapshot received from the leader, persisting it first so
    /// that a crash right after cannot bring back the older state.
    fn install(&mut self, meta: &SnapshotMeta<u64, BasicNode>, data: &[u8]) -> Result<(), StoreError> {
        let group = decode_group(data)?;
        write_snapshot(&self.db, meta, data, WriteMode::Replace)?;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        *self.group.write() = Applied { state: group, index: meta.last_log_id.map_or(0, |id| id.index) };
        Ok(())
    }
}

impl<C: SurgeTypeConfig> RaftStateMachine<C> for StateMachineStore<C> {
    type SnapshotBuilder = SnapshotBuilder<C>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.apply_entries(entries.into_iter()))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        // A copy, so that entries applied while the snapshot is being encoded and written
        // do not leak into it: the snapshot must be exactly the state at `last_applied`.
        SnapshotBuilder {
            db: self.db.clone(),
            applied: MachineState {
                last_applied: self.last_applied,
                last_membership: self.last_membership.clone(),
                group: self.group.read(GroupState::clone),
            },
            seq: self.snapshots_built,
            _config: std::marker::PhantomData,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        tracing::debug!(%meta, "install snapshot");
        self.install(meta, snapshot.get_ref())
            .map_err(to_storage_error(|e| StorageIOError::write_snapshot(Some(meta.signature()), e)))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, StorageError<u64>> {
        let stored = read_snapshot(&self.db).map_err(to_storage_error(|e| StorageIOError::read_snapshot(None, e)))?;
        Ok(stored.map(|StoredSnapshot { meta, data }| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// Builds a snapshot of the state as it was when openraft asked for the builder.
pub struct SnapshotBuilder<C> {
    /// Where the snapshot is persisted.
    db: Arc<Database>,
    /// The state to snapshot, copied from the state machine.
    applied: MachineState,
    /// The state machine's snapshot counter at the copy, part of the snapshot id.
    seq: u64,
    /// Ties the builder to one Raft type config without storing a value of it.
    _config: std::marker::PhantomData<C>,
}

impl<C> Debug for SnapshotBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotBuilder")
            .field("last_applied", &self.applied.last_applied)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl<C: SurgeTypeConfig> SnapshotBuilder<C> {
    /// Encodes and durably stores the copied state, returning its meta and data.
    fn build(&self) -> Result<(SnapshotMeta<u64, BasicNode>, Vec<u8>), StoreError> {
        // Assert before writing: a snapshot outlives the log it replaces, so a broken
        // state must stop here rather than become the recovery point.
        self.applied.group.check_invariants();
        let data = codec::encode(&self.applied.group)?;
        let last = match &self.applied.last_applied {
            Some(log_id) => format!("{}-{}", log_id.leader_id, log_id.index),
            None => "none".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied.last_applied,
            last_membership: self.applied.last_membership.clone(),
            snapshot_id: format!("{last}-{}", self.seq),
        };
        write_snapshot(&self.db, &meta, &data, WriteMode::KeepNewer)?;
        Ok((meta, data))
    }
}

impl<C: SurgeTypeConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<C> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<u64>> {
        let (meta, data) = self.build().map_err(to_storage_error(|e| StorageIOError::write_snapshot(None, e)))?;
        tracing::debug!(%meta, bytes = data.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Decodes snapshot data into a group state and asserts its invariants (assert after
/// reading: the bytes may come from disk or from another node).
fn decode_group(data: &[u8]) -> Result<GroupState, StoreError> {
    let group: GroupState = codec::decode(data)?;
    group.check_invariants();
    Ok(group)
}

/// Whether a snapshot write may replace a snapshot that covers more of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    /// Always replace: the leader's snapshot is authoritative when installed.
    Replace,
    /// Keep the stored snapshot if it is newer. A builder runs concurrently with the state
    /// machine, so a snapshot installed meanwhile may already cover more; going back to
    /// an older one would lose entries that may already be purged.
    KeepNewer,
}

/// Durably stores a snapshot's meta and data in one transaction.
fn write_snapshot(
    db: &Database,
    meta: &SnapshotMeta<u64, BasicNode>,
    data: &[u8],
    mode: WriteMode,
) -> Result<(), StoreError> {
    let meta_bytes = codec::encode(meta)?;
    let txn = schema::begin_durable_write(db)?;
    {
        let mut table = txn.open_table(schema::SNAPSHOT)?;
        if mode == WriteMode::KeepNewer {
            // Checked inside the write transaction: writers are serialised, so nothing can
            // slip in between this read and the insert below.
            if let Some(stored) = table.get(schema::KEY_SNAPSHOT_META)? {
                let stored: SnapshotMeta<u64, BasicNode> = codec::decode(stored.value())?;
                if stored.last_log_id > meta.last_log_id {
                    return Ok(());
                }
            }
        }
        table.insert(schema::KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
        table.insert(schema::KEY_SNAPSHOT_DATA, data)?;
    }
    txn.commit()?;
    Ok(())
}

/// A snapshot as stored in the `SNAPSHOT` table.
struct StoredSnapshot {
    /// Which log prefix and membership the data covers.
    meta: SnapshotMeta<u64, BasicNode>,
    /// The encoded `GroupState`, exactly as sent to followers.
    data: Vec<u8>,
}

/// Reads the current snapshot, if one was ever stored.
fn read_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(schema::SNAPSHOT)?;
    let Some(meta) = table.get(schema::KEY_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let meta = codec::decode(meta.value())?;
    let data = table
        .get(schema::KEY_SNAPSHOT_DATA)?
        .ok_or_else(|| StoreError::Inconsistent("snapshot meta is stored without its data".to_owned()))?
        .value()
        .to_vec();
    Ok(Some(StoredSnapshot { meta, data }))
}
