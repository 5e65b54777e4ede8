//! The Raft log, vote and log pointers of one group, in redb.

use std::fmt;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::GroupState;
use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::AsyncRuntime;
use openraft::EntryPayload;
use openraft::Instant;
use openraft::LogId;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::Vote;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::error::to_storage_error;
use crate::schema;
use crate::StoreError;
use crate::SurgeTypeConfig;

/// The Raft log store of one group: log entries, vote, committed log id and last purged
/// log id, all in the group's redb database.
///
/// It keeps no state in memory: every call is one short redb transaction, so the store is
/// always exactly what is on disk, and clones (the log readers openraft hands to
/// replication tasks) need no synchronisation beyond redb's own MVCC.
///
/// Durability: `append`, `save_vote`, `truncate` and `purge` commit with fsync before they
/// return, so every write that openraft is told about survives a crash. Only
/// `save_committed` is not fsynced, unless [`LogStore::durable_commits`] says so; see
/// its comment.
pub struct LogStore<C> {
    /// The group's database, shared with its [`crate::StateMachineStore`].
    db: Arc<Database>,
    /// Whether `save_committed` fsyncs; shared by every clone.
    durable_commits: Arc<AtomicBool>,
    /// How long the device takes to make a write durable, beyond redb's own
    /// time: the simulator's slow disk. None on a real device.
    write_delay: Option<WriteDelay>,
    /// How long appends take lately; shared by every clone.
    append_times: AppendTimes,
    /// Ties the store to one Raft type config without storing a value of it.
    _config: PhantomData<C>,
}

/// How long a device takes to make each write durable, asked before every
/// durable log write: a seam for the simulator's slow disk, which sets it
/// per node while a fault lasts. A real device is as slow as it is.
#[derive(Clone)]
pub struct WriteDelay(Arc<dyn Fn() -> Duration + Send + Sync>);

impl WriteDelay {
    /// A delay `now` reads afresh before each write.
    pub fn new(now: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        WriteDelay(Arc::new(now))
    }
}

impl Debug for WriteDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WriteDelay").field(&(self.0)()).finish()
    }
}

/// How long a store's appends take lately, fsync included: a moving average
/// that gives each new append an eighth of the weight. A healthy disk keeps
/// it at a few milliseconds; a leader whose disk is sick hands leadership
/// over (`cluster::Group`), since every commit waits for its append.
#[derive(Clone, Debug, Default)]
pub struct AppendTimes(Arc<AtomicU64>);

impl AppendTimes {
    /// The moving average.
    pub fn recent(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }

    fn note(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let average = self.0.load(Ordering::Relaxed);
        self.0.store(average - average / 8 + took / 8, Ordering::Relaxed);
    }
}

impl<C> LogStore<C> {
    /// Wraps a database whose tables [`crate::from_database`] has created.
    pub(crate) fn new(db: Arc<Database>) -> Self {
        Self {
            db,
            durable_commits: Arc::default(),
            write_delay: None,
            append_times: AppendTimes::default(),
            _config: PhantomData,
        }
    }

    /// How long this store's appends take lately.
    pub fn append_times(&self) -> AppendTimes {
        self.append_times.clone()
    }

    /// The same store on a device that takes `delay` longer for each durable
    /// write (append, vote, truncate, purge), while openraft waits for it as
    /// for a slow fsync.
    pub fn with_write_delay(self, delay: Option<WriteDelay>) -> Self {
        Self { write_delay: delay, ..self }
    }

    /// The switch that makes `save_committed` fsync. A DR copy turns it on: it
    /// confirms escrow grants it has applied, and after a crash it must apply at
    /// least as far again before it could be promoted. It is off the commit path, so
    /// the extra fsync costs checkout nothing.
    pub fn durable_commits(&self) -> Arc<AtomicBool> {
        self.durable_commits.clone()
    }
}

// Manual impls: derives would demand `C: Clone + Debug` for no reason.
impl<C> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            durable_commits: self.durable_commits.clone(),
            write_delay: self.write_delay.clone(),
            append_times: self.append_times.clone(),
            _config: PhantomData,
        }
    }
}

impl<C> Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl<C: SurgeTypeConfig> LogStore<C> {
    /// Waits as long as the device is slow now (see [`WriteDelay`]).
    async fn device_busy(&self) {
        let delay = self.write_delay.as_ref().map_or(Duration::ZERO, |delay| (delay.0)());
        if !delay.is_zero() {
            C::AsyncRuntime::sleep(delay).await;
        }
    }

    /// Reads one record of the `LOG_META` table.
    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(schema::LOG_META)?;
        let value = table.get(key)?;
        value.map(|bytes| codec::decode(bytes.value())).transpose().map_err(StoreError::from)
    }

    /// Writes one record of the `LOG_META` table, fsynced or not.
    fn write_meta<T: Serialize>(&self, key: &str, value: &T, durable: bool) -> Result<(), StoreError> {
        let bytes = codec::encode(value)?;
        let txn = if durable { schema::begin_durable_write(&self.db)? } else { schema::begin_lazy_write(&self.db)? };
        txn.open_table(schema::LOG_META)?.insert(key, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Reads the entries whose index is in `range`, in log order.
    fn read_entries(&self, range: (Bound<u64>, Bound<u64>)) -> Result<Vec<C::Entry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(schema::LOG)?;
        let mut entries = Vec::new();
        for row in table.range::<u64>(range)? {
            let (index, bytes) = row?;
            entries.push(decode_entry::<C>(index.value(), bytes.value())?);
        }
        Ok(entries)
    }

    /// `state`, applied up to log index `applied`, with every later entry
    /// of this log applied to it too, committed or not: a superset of what
    /// this node's copy may have acknowledged. A node that crashed may know
    /// less as committed than it had applied (the commit index is saved
    /// without fsync), and with no leader to tell it, its applied state
    /// lacks the tail; this copy does not.
    pub fn with_whole_log(&self, state: &GroupState, applied: u64) -> Result<GroupState, StoreError> {
        let mut state = state.clone();
        for entry in self.read_entries((Bound::Excluded(applied), Bound::Unbounded))? {
            if let EntryPayload::Normal(request) = entry.payload {
                state.apply(&request);
            }
        }
        Ok(state)
    }

    /// The id of the last entry in the log (or of the last one purged, if
    /// the log is empty since).
    pub fn last_log_id(&self) -> Result<Option<LogId<u64>>, StoreError> {
        Ok(self.read_log_state()?.last_log_id)
    }

    /// Reads the first and last log state in one snapshot of the database.
    fn read_log_state(&self) -> Result<LogState<C>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(schema::LOG_META)?;
        let last_purged_log_id: Option<LogId<u64>> = match meta.get(schema::KEY_LAST_PURGED)? {
            Some(bytes) => Some(codec::decode(bytes.value())?),
            None => None,
        };
        let log = txn.open_table(schema::LOG)?;
        let last_log_id = match log.last()? {
            Some((index, bytes)) => Some(decode_entry::<C>(index.value(), bytes.value())?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    /// Writes `entries` in one durable transaction.
    fn write_entries(&self, entries: impl Iterator<Item = C::Entry>) -> Result<(), StoreError> {
        let mut entries = entries.peekable();
        if entries.peek().is_none() {
            // Nothing to make durable; skip the commit and its fsync.
            return Ok(());
        }
        let txn = if domain::mutation::active(domain::mutation::Mutation::AckBeforeFsync) {
            schema::begin_lazy_write(&self.db)?
        } else {
            schema::begin_durable_write(&self.db)?
        };
        {
            let mut table = txn.open_table(schema::LOG)?;
            for entry in entries {
                let bytes = codec::encode(&entry)?;
                table.insert(entry.log_id.index, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Deletes every entry at or after `since_index`, durably.
    fn delete_since(&self, since_index: u64) -> Result<(), StoreError> {
        let txn = schema::begin_durable_write(&self.db)?;
        txn.open_table(schema::LOG)?.retain_in::<u64, _>(since_index.., |_, _| false)?;
        txn.commit()?;
        Ok(())
    }

    /// Records `upto` as purged and deletes every entry up to it, in one durable
    /// transaction, so the log never shows a gap without the purge pointer explaining it.
    fn purge_upto(&self, upto: LogId<u64>) -> Result<(), StoreError> {
        let txn = schema::begin_durable_write(&self.db)?;
        {
            let mut meta = txn.open_table(schema::LOG_META)?;
            let previous: Option<LogId<u64>> = match meta.get(schema::KEY_LAST_PURGED)? {
                Some(bytes) => Some(codec::decode(bytes.value())?),
                None => None,
            };
            // openraft purges monotonically; a smaller purge would move the pointer back
            // over entries that are already gone.
            if previous.is_some_and(|previous| previous.index >= upto.index) {
                return Ok(());
            }
            meta.insert(schema::KEY_LAST_PURGED, codec::encode(&upto)?.as_slice())?;
        }
        txn.open_table(schema::LOG)?.retain_in::<u64, _>(..=upto.index, |_, _| false)?;
        txn.commit()?;
        Ok(())
    }
}

/// Decodes a stored entry and checks it is stored under its own index (assert after
/// reading: a mismatch is corruption, not something Raft should see).
fn decode_entry<C: SurgeTypeConfig>(index: u64, bytes: &[u8]) -> Result<C::Entry, StoreError> {
    let entry: C::Entry = codec::decode(bytes)?;
    if entry.log_id.index != index {
        return Err(StoreError::Inconsistent(format!("log entry {} is stored under index {index}", entry.log_id)));
    }
    Ok(entry)
}

impl<C: SurgeTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.read_entries(bounds).map_err(to_storage_error(StorageIOError::read_logs))
    }
}

impl<C: SurgeTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        self.read_log_state().map_err(to_storage_error(StorageIOError::read_logs))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        // Durable: a node that forgot its vote could vote twice in one term.
        self.device_busy().await;
        self.write_meta(schema::KEY_VOTE, vote, true).map_err(to_storage_error(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.read_meta(schema::KEY_VOTE).map_err(to_storage_error(StorageIOError::read_vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        // Not fsynced: openraft treats the saved committed id as a hint that lets a
        // restarting node re-apply its log before it hears from a leader. Losing the
        // latest value in a crash only makes that re-apply stop earlier; the leader
        // re-sends the commit index. Fsyncing it would double the fsyncs on the hot path.
        // The next durable commit (the next append) persists it, since redb orders commits.
        // A DR copy fsyncs it (see `durable_commits`).
        let durable = self.durable_commits.load(Ordering::Relaxed);
        self.write_meta(schema::KEY_COMMITTED, &committed, durable).map_err(to_storage_error(StorageIOError::write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        // Stored as `Option` because openraft may save `None`; flatten "never saved".
        self.read_meta::<Option<LogId<u64>>>(schema::KEY_COMMITTED)
            .map(Option::flatten)
            .map_err(to_storage_error(StorageIOError::read))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The commit fsyncs before it returns, so the entries are on disk when openraft
        // is told they are: an acknowledged append survives a crash. Writing inline
        // (no background flusher) keeps the store single-threaded for the simulator, and
        // costs nothing: openraft 0.9's core awaits this callback (`append_to_log`) before
        // it runs its next command, the replication included.
        let started = <C::AsyncRuntime as AsyncRuntime>::Instant::now();
        self.device_busy().await;
        self.write_entries(entries.into_iter()).map_err(to_storage_error(StorageIOError::write_logs))?;
        self.append_times.note(started.elapsed());
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        tracing::debug!(%log_id, "truncate log");
        self.device_busy().await;
        self.delete_since(log_id.index).map_err(to_storage_error(StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        tracing::debug!(%log_id, "purge log");
        self.device_busy().await;
        self.purge_upto(log_id).map_err(to_storage_error(StorageIOError::write_logs))
    }
}
