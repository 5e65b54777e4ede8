//! Read indexes shared by the reads that wait for them.
//!
//! A read index costs the leader a round of heartbeats to a quorum (openraft's
//! `get_read_log_id`), and a flash-sale crowd polls its SKU's stock all the
//! time. So the leader runs one round at a time: every read that arrives while
//! a round is under way waits for it to end, and all of them share the next
//! one. A crowd's reads cost one quorum round per round trip, not one each.
//!
//! A read may only use a round that began after it arrived: an earlier one may
//! have confirmed leadership before the read's own predecessor committed, and
//! would miss it. Rounds are numbered as they begin, and a read takes the
//! answer of a round numbered above what it saw when it arrived.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ProposeError;

/// The rounds of one group's leader.
#[derive(Default)]
pub struct ReadRounds {
    /// Rounds begun so far; a round's number is the count once it began.
    begun: AtomicU64,
    /// Held while a round runs. Inside: the latest round's number and answer.
    latest: tokio::sync::Mutex<Option<(u64, Result<u64, ProposeError>)>>,
}

impl ReadRounds {
    /// The read index for a read arriving now: the answer of a round that
    /// began after it arrived, run by `round` if no other read runs one.
    /// A read that is dropped while running its round leaves the next read
    /// in line to run its own.
    pub async fn read_index<F, Fut>(&self, round: F) -> Result<u64, ProposeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, ProposeError>>,
    {
        let arrived = self.begun.load(Ordering::SeqCst);
        let mut latest = self.latest.lock().await;
        if let Some((number, answer)) = latest.as_ref() {
            if *number > arrived {
                return answer.clone();
            }
        }
        let number = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = round().await;
        *latest = Some((number, answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// Rounds that each wait for a permit, then answer their own number.
    struct Quorum {
        rounds: ReadRounds,
        run: AtomicU64,
        finish: Semaphore,
    }

    impl Quorum {
        async fn read(&self) -> Result<u64, ProposeError> {
            self.rounds
                .read_index(|| async {
                    let number = self.run.fetch_add(1, Ordering::SeqCst) + 1;
                    self.finish.acquire().await.unwrap().forget();
                    Ok(number)
                })
                .await
        }
    }

    #[tokio::test]
    async fn reads_arriving_during_a_round_share_the_next_one() {
        let quorum =
            Arc::new(Quorum { rounds: ReadRounds::default(), run: AtomicU64::new(0), finish: Semaphore::new(0) });
        let first = tokio::spawn({
            let quorum = quorum.clone();
            async move { quorum.read().await }
        });
        while quorum.run.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Arrived while round 1 runs: it began before them, so they may not
        // use it, and they share round 2.
        let crowd: Vec<_> = (0..20)
            .map(|_| {
                let quorum = quorum.clone();
                tokio::spawn(async move { quorum.read().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        quorum.finish.add_permits(2);

        assert_eq!(first.await.unwrap(), Ok(1));
        for read in crowd {
            assert_eq!(read.await.unwrap(), Ok(2), "a read used a round that began before it arrived");
        }
        assert_eq!(quorum.run.load(Ordering::SeqCst), 2, "21 reads, two rounds");
    }

    #[tokio::test]
    async fn a_failed_round_fails_the_reads_that_shared_it_and_the_next_read_runs_its_own() {
        let rounds = ReadRounds::default();
        let not_leader = || async { Err(ProposeError::NotLeader { leader: Some(3) }) };
        assert_eq!(rounds.read_index(not_leader).await, Err(ProposeError::NotLeader { leader: Some(3) }));
        assert_eq!(rounds.read_index(|| async { Ok(7) }).await, Ok(7));
    }
}
