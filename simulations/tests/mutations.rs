//! The checkers are not vacuous: with each known bug switched on, the
//! simulator finds a failing seed within a bounded number of runs. (CI also
//! runs a thousand seeds with every bug off, all of which must pass.)

use domain::mutation::Mutation;
use simulations::sim::{self, Options};

/// Seeds tried per bug before the test gives up on finding it.
const SEEDS: u64 = 30;

#[test]
fn every_known_bug_fails_a_seed_within_a_bounded_number_of_runs() {
    sim::capture_panics();
    for mutation in Mutation::ALL {
        let options = Options { mutation: Some(mutation), ..Options::default() };
        let caught = (1..=SEEDS).find_map(|seed| {
            let report = sim::run(seed, &options);
            (!report.passed()).then_some((seed, report.found.failures))
        });
        match caught {
            Some((seed, failures)) => println!("{}: seed {seed} fails: {}", mutation.name(), failures[0]),
            None => panic!("{} went unnoticed for {SEEDS} seeds", mutation.name()),
        }
    }
}
