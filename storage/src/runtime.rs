//! The async runtime of Surge's Raft groups: openraft's tokio runtime, except
//! that the randomness openraft draws (its election timeouts) comes from a
//! thread-local generator that the deterministic simulator seeds.
//!
//! Unseeded, the generator starts from OS entropy, like `rand::thread_rng`,
//! so production behaves exactly as with [`openraft::TokioRuntime`]. The
//! simulator runs every node on one thread, seeds the generator from the
//! run's seed, and so gets the same election timeouts on every replay.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RAFT_RNG: RefCell<StdRng> = RefCell::new(StdRng::from_entropy());
}

/// Makes every Raft instance on this thread draw from a generator seeded
/// with `seed` from now on.
pub fn seed_raft_rng(seed: u64) {
    RAFT_RNG.with(|rng| *rng.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// A handle on this thread's Raft generator.
#[derive(Clone, Copy, Debug, Default)]
pub struct RaftRng;

impl RngCore for RaftRng {
    fn next_u32(&mut self) -> u32 {
        RAFT_RNG.with(|rng| rng.borrow_mut().next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        RAFT_RNG.with(|rng| rng.borrow_mut().next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        RAFT_RNG.with(|rng| rng.borrow_mut().fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        RAFT_RNG.with(|rng| rng.borrow_mut().try_fill_bytes(dest))
    }
}

/// openraft's tokio runtime with [`RaftRng`] as its randomness.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SurgeRuntime;

impl AsyncRuntime for SurgeRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = RaftRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        RaftRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn a_seeded_generator_repeats_itself() {
        let draw = || (0..8).map(|_| SurgeRuntime::thread_rng().gen_range(0..1_000_000u32)).collect::<Vec<_>>();
        seed_raft_rng(7);
        let first = draw();
        seed_raft_rng(7);
        assert_eq!(draw(), first);
        seed_raft_rng(8);
        assert_ne!(draw(), first);
    }
}
