//! openraft's own storage conformance suite, run against the redb store.

use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::StorageError;
use openraft::StorageIOError;
use storage::LogStore;
use storage::StateMachineStore;
use storage::TypeConfig;
use tempfile::TempDir;

/// Opens a fresh database in a new temporary directory for every suite case; the
/// directory is the guard, so it lives exactly as long as the stores.
struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, StateMachineStore<TypeConfig>, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore<TypeConfig>, StateMachineStore<TypeConfig>), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let (log, state_machine) =
            storage::open(&dir.path().join("group.redb")).map_err(|e| StorageIOError::read(&e))?;
        Ok((dir, log, state_machine))
    }
}

/// A plain `#[test]`: the suite starts its own tokio runtime per case.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(RedbStoreBuilder).expect("storage suite passes");
}
