//! What a node finds when it reopens its database after a shutdown or crash.

use std::collections::BTreeSet;

use domain::GroupState;
use domain::Request;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftLogStorageExt;
use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::Membership;
use openraft::RaftLogReader;
use openraft::RaftSnapshotBuilder;
use openraft::StorageHelper;
use openraft::StoredMembership;
use openraft::Vote;
use storage::TypeConfig;

/// The log every test writes: a membership entry at index 1, then normal entries whose
/// leader timestamps advance the group's clock, so each applied entry changes the state.
fn entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
    indexes
        .map(|index| {
            let log_id = log_id(1, 1, index);
            let payload = if index == 1 {
                EntryPayload::Membership(membership())
            } else {
                EntryPayload::Normal(Request { stamped_at_ms: index * 1_000, commands: Vec::new() })
            };
            Entry { log_id, payload }
        })
        .collect()
}

fn membership() -> Membership<u64, openraft::BasicNode> {
    Membership::new(vec![BTreeSet::from([1, 2, 3])], None)
}

fn at(index: u64) -> LogId<u64> {
    log_id(1, 1, index)
}

#[tokio::test]
async fn reopen_recovers_vote_log_pointers_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.redb");
    let vote = Vote::new_committed(1, 1);

    // --- before the restart: entries 1..=12 appended, 11.. truncated, 1..=10 committed
    // and applied, a snapshot at 6, the log purged up to 4.
    let (state_at_6, state_at_10, snapshot_meta) = {
        let (mut log, mut sm) = storage::open::<TypeConfig>(&path).unwrap();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries(1..=12)).await.unwrap();
        log.truncate(at(11)).await.unwrap();
        log.save_committed(Some(at(10))).await.unwrap();

        let responses = sm.apply(entries(1..=6)).await.unwrap();
        assert_eq!(responses.len(), 6, "one response per entry");
        let state_at_6 = sm.reader().read(GroupState::clone);
        assert_ne!(state_at_6, GroupState::default(), "applying entries changed the state");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(at(6)));

        sm.apply(entries(7..=10)).await.unwrap();
        let state_at_10 = sm.reader().read(GroupState::clone);
        log.purge(at(4)).await.unwrap();
        (state_at_6, state_at_10, snapshot.meta)
    };

    // --- after: everything durable is back; the applied state is the snapshot's.
    let (mut log, mut sm) = storage::open::<TypeConfig>(&path).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(at(10)));
    let log_state = log.get_log_state().await.unwrap();
    assert_eq!(log_state.last_purged_log_id, Some(at(4)));
    assert_eq!(log_state.last_log_id, Some(at(10)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries(5..=10));

    let (last_applied, last_membership) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(at(6)), "last_applied is the snapshot's last log id");
    assert_eq!(last_membership, StoredMembership::new(Some(at(1)), membership()));
    assert_eq!(sm.reader().read(GroupState::clone), state_at_6);

    let snapshot = sm.get_current_snapshot().await.unwrap().expect("snapshot survives");
    assert_eq!(snapshot.meta, snapshot_meta);
    let data: GroupState = storage::codec::decode(snapshot.snapshot.get_ref()).unwrap();
    assert_eq!(data, state_at_6);

    // --- openraft's startup re-applies the committed entries after the snapshot, and
    // determinism brings back exactly the state from before the restart.
    let initial = StorageHelper::new(&mut log, &mut sm).get_initial_state().await.unwrap();
    assert_eq!(initial.committed, Some(at(10)));
    assert_eq!(initial.snapshot_meta, snapshot_meta);
    assert_eq!(initial.vote_ref(), &vote);
    assert_eq!(sm.applied_state().await.unwrap().0, Some(at(10)));
    assert_eq!(sm.reader().read(GroupState::clone), state_at_10);
}

#[tokio::test]
async fn installed_snapshot_replaces_state_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.redb");

    // A leader's snapshot at 8 ...
    let leader_dir = tempfile::tempdir().unwrap();
    let (_leader_log, mut leader_sm) = storage::open::<TypeConfig>(&leader_dir.path().join("leader.redb")).unwrap();
    leader_sm.apply(entries(1..=8)).await.unwrap();
    let snapshot = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

    // ... installed on a follower that is behind ...
    {
        let (_log, mut sm) = storage::open::<TypeConfig>(&path).unwrap();
        sm.apply(entries(1..=3)).await.unwrap();
        let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
        receiving.get_mut().extend_from_slice(snapshot.snapshot.get_ref());
        sm.install_snapshot(&snapshot.meta, receiving).await.unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, Some(at(8)));
        assert_eq!(sm.reader().read(GroupState::clone), leader_sm.reader().read(GroupState::clone));
    }

    // ... is what the follower restarts from.
    let (_log, mut sm) = storage::open::<TypeConfig>(&path).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(at(8)));
    assert_eq!(sm.reader().read(GroupState::clone), leader_sm.reader().read(GroupState::clone));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn stale_snapshot_build_does_not_replace_a_newer_installed_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = storage::open::<TypeConfig>(&dir.path().join("group.redb")).unwrap();
    sm.apply(entries(1..=3)).await.unwrap();
    // The builder copies the state at 3, then a snapshot at 8 is installed before it runs.
    let mut stale_builder = sm.get_snapshot_builder().await;

    let leader_dir = tempfile::tempdir().unwrap();
    let (_leader_log, mut leader_sm) = storage::open::<TypeConfig>(&leader_dir.path().join("leader.redb")).unwrap();
    leader_sm.apply(entries(1..=8)).await.unwrap();
    let newer = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    sm.install_snapshot(&newer.meta, Box::new(newer.snapshot.as_ref().clone())).await.unwrap();

    let stale = stale_builder.build_snapshot().await.unwrap();
    assert_eq!(stale.meta.last_log_id, Some(at(3)));
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, newer.meta, "the newer snapshot stays current");
}

/// Failback reconciles with a returning node's copy. After a crash the node
/// may know less as committed than its leader acknowledged (the commit index
/// is saved without fsync), and no leader will tell it more, so its applied
/// state lacks the tail; the copy with its whole log applied does not.
#[tokio::test]
async fn the_whole_log_copy_has_every_logged_entry_though_the_commit_index_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.redb");
    let everything = {
        let (mut log, mut sm) = storage::open::<TypeConfig>(&path).unwrap();
        log.blocking_append(entries(1..=10)).await.unwrap();
        sm.apply(entries(1..=10)).await.unwrap();
        sm.reader().read(GroupState::clone)
    };

    let (log, sm) = storage::open::<TypeConfig>(&path).unwrap();
    let (applied, index) = sm.reader().read_at(GroupState::clone);
    assert_eq!((index, &applied), (0, &GroupState::default()), "nothing committed is known: nothing replayed");
    assert_eq!(log.with_whole_log(&applied, index).unwrap(), everything);
}
