//! Edge cases of the log store that openraft's suite does not cover.

use openraft::storage::RaftLogStorage;
use openraft::storage::RaftLogStorageExt;
use openraft::testing::blank_ent;
use openraft::testing::log_id;
use openraft::RaftLogReader;
use storage::LogStore;
use storage::TypeConfig;
use tempfile::TempDir;

fn open() -> (TempDir, LogStore<TypeConfig>) {
    let dir = tempfile::tempdir().unwrap();
    let (log, _sm) = storage::open::<TypeConfig>(&dir.path().join("group.redb")).unwrap();
    (dir, log)
}

#[tokio::test]
async fn empty_and_inverted_ranges_read_nothing() {
    let (_dir, mut log) = open();
    log.blocking_append((1..=5).map(|i| blank_ent::<TypeConfig>(1, 1, i))).await.unwrap();

    assert!(log.try_get_log_entries(3..3).await.unwrap().is_empty());
    #[allow(clippy::reversed_empty_ranges)]
    let inverted = 4..2;
    assert!(log.try_get_log_entries(inverted).await.unwrap().is_empty());
    assert_eq!(log.try_get_log_entries(2..=3).await.unwrap().len(), 2);
    assert_eq!(log.try_get_log_entries(4..).await.unwrap().len(), 2);
}

#[tokio::test]
async fn empty_append_still_acknowledges() {
    let (_dir, mut log) = open();
    // blocking_append waits for the callback, so this hangs if the store forgets it.
    log.blocking_append(Vec::new()).await.unwrap();
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, None);
}

#[tokio::test]
async fn purge_never_moves_the_pointer_back() {
    let (_dir, mut log) = open();
    log.blocking_append((1..=5).map(|i| blank_ent::<TypeConfig>(1, 1, i))).await.unwrap();
    log.purge(log_id(1, 1, 3)).await.unwrap();
    log.purge(log_id(1, 1, 2)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 5)));
}
