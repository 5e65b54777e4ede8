//! Surge's deterministic simulator.
//!
//! Every node of the default topology (zones a and b, the tiebreaker) runs
//! its real actors, openraft group and redb storage in this one thread, on a
//! simulated network, disk and clock, while a seeded schedule breaks things
//! and a seeded crowd shops. Checkers then prove the invariants of
//! DESIGN.md. A seed replays its run exactly:
//!
//! ```text
//! cargo run -p simulations --release -- --seed 42 --trace
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use domain::mutation::Mutation;
use simulations::sim::{self, Options};
use simulations::workload::SecondFailovers;

/// Run seeds of the whole-topology simulation and check every invariant.
///
/// With no seed given: replays the regression seeds, checks determinism
/// (each of a few seeds run twice must give the same trace), then runs
/// fresh random seeds.
#[derive(Parser, Debug)]
struct Args {
    /// Run this one seed (and nothing else).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every event of the run as it happens (with --seed).
    #[arg(long)]
    trace: bool,
    /// Also print the nodes' own log lines that pass this filter
    /// (`tracing` directives, e.g. `cluster=info,openraft=warn`).
    #[arg(long)]
    log: Option<String>,
    /// Switch a known bug on (skip-stock-check, apply-retry-twice,
    /// ack-before-fsync, deposed-leader-acks, confirm-unheard-escrow,
    /// ignore-fence, replace-in-place): the runs should fail.
    #[arg(long, value_parser = parse_mutation)]
    mutation: Option<Mutation>,
    /// Fresh random seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// Keep running fresh seeds for this many minutes instead (soak).
    #[arg(long)]
    minutes: Option<u64>,
    /// The first fresh seed (default: drawn from the OS); the next ones follow it.
    #[arg(long)]
    from: Option<u64>,
    /// Seeds checked for determinism by running each twice.
    #[arg(long, default_value_t = 3)]
    determinism: u64,
    /// The regression list: seeds that once failed, replayed every run.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/regressions.txt"))]
    regressions: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sim::capture_panics();
    if let Some(filter) = &args.log {
        // Wall-clock stamps would say nothing here: each line falls between
        // the trace events around it, in simulated order.
        let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log")?;
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .without_time()
            .with_ansi(ansi)
            .with_writer(std::io::stdout)
            .init();
    }
    if let Some(seed) = args.seed {
        let started = Instant::now();
        let report = sim::run(seed, &Options { echo: args.trace, mutation: args.mutation, ..Options::default() });
        print_report(&report, started.elapsed());
        if !report.passed() {
            bail!("seed {seed} failed");
        }
        return Ok(());
    }

    let mut totals = Totals { mutation: args.mutation, ..Totals::default() };
    let regressions = read_regressions(&args.regressions)?;
    println!("regression seeds: {}", regressions.len());
    for seed in regressions {
        totals.run(seed);
    }

    let from = args.from.unwrap_or_else(rand::random);
    println!("fresh seeds from {from}");
    for seed in from..from.saturating_add(args.determinism) {
        let keep = Options { keep: true, mutation: args.mutation, ..Options::default() };
        let watchdog = Watchdog::start(seed);
        let (first, second) = (sim::run(seed, &keep), sim::run(seed, &keep));
        drop(watchdog);
        if first.hash != second.hash {
            let at = first.trace.iter().zip(&second.trace).position(|(a, b)| a != b).unwrap_or(first.trace.len());
            println!("seed {seed} is NOT deterministic: traces differ from event {at}");
            println!("  first run:  {}", first.trace.get(at).map_or("(ended)", String::as_str));
            println!("  second run: {}", second.trace.get(at).map_or("(ended)", String::as_str));
            totals.failed.push(seed);
        } else {
            println!("seed {seed} deterministic: {} events, trace {}", first.events, &first.hash[..16]);
        }
    }

    let deadline = args.minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));
    let mut seed = from;
    loop {
        let done = match deadline {
            Some(deadline) => Instant::now() >= deadline,
            None => seed >= from.saturating_add(args.seeds),
        };
        if done {
            break;
        }
        totals.run(seed);
        seed += 1;
    }
    totals.print();
    if !totals.failed.is_empty() {
        bail!("{} seed(s) failed: {:?}", totals.failed.len(), totals.failed);
    }
    Ok(())
}

fn parse_mutation(name: &str) -> Result<Mutation, String> {
    let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
    Mutation::named(name).ok_or_else(|| format!("one of {}", names.join(", ")))
}

/// Seeds from the regression file: one per line, `#` starts a comment.
fn read_regressions(path: &PathBuf) -> anyhow::Result<Vec<u64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| line.parse().with_context(|| format!("{}: {line:?} is not a seed", path.display())))
        .collect()
}

/// Counts over many runs.
#[derive(Default)]
struct Totals {
    runs: u64,
    simulated_ms: u64,
    wall: Duration,
    acked: usize,
    /// Runs that lost the primary region, and the acknowledgements their
    /// failovers lost (every one reported, or the run failed).
    region_losses: u64,
    lost_reported: usize,
    /// Second failovers the sampler tried after those losses.
    second_failovers: SecondFailovers,
    /// Of those runs, the ones whose failback went without copies lost for
    /// good, and how many copies in all.
    disks_lost_runs: u64,
    copies_lost: usize,
    /// Nodes whose disks were lost for good in runs that kept their
    /// region, all replaced.
    disks_replaced: usize,
    /// Disks that were slow for a while.
    slow_disks: usize,
    failed: Vec<u64>,
    /// When to print the next progress line.
    next_progress: u64,
    mutation: Option<Mutation>,
}

impl Totals {
    fn run(&mut self, seed: u64) {
        let started = Instant::now();
        let watchdog = Watchdog::start(seed);
        let report = sim::run(seed, &Options { mutation: self.mutation, ..Options::default() });
        drop(watchdog);
        let wall = started.elapsed();
        let found = &report.found;
        self.runs += 1;
        self.simulated_ms += found.simulated_ms;
        self.wall += wall;
        self.acked += found.acked;
        self.disks_replaced += found.disks_replaced;
        self.slow_disks += found.slow_disks;
        if let Some(lost) = found.lost_reported {
            self.region_losses += 1;
            self.lost_reported += lost;
            self.second_failovers.promoted += found.second_failovers.promoted;
            self.second_failovers.refused += found.second_failovers.refused;
            self.disks_lost_runs += u64::from(found.copies_lost > 0);
            self.copies_lost += found.copies_lost;
        }
        if !report.passed() {
            print_report(&report, wall);
            self.failed.push(seed);
        } else if self.runs >= self.next_progress {
            println!("{} runs, {} failed so far", self.runs, self.failed.len());
            self.next_progress += 100;
        }
    }

    fn print(&self) {
        let simulated = self.simulated_ms as f64 / 1000.0;
        println!(
            "{} runs, {} failed; {:.0} simulated s in {:.1} wall s ({:.0} simulated s per wall s); {} orders acknowledged",
            self.runs,
            self.failed.len(),
            simulated,
            self.wall.as_secs_f64(),
            simulated / self.wall.as_secs_f64().max(1e-9),
            self.acked
        );
        println!(
            "{} runs lost the primary region; their failovers lost {} acknowledgements, each named in the report",
            self.region_losses, self.lost_reported
        );
        println!(
            "{} of them lost disks for good: failback went without {} copies, returning none of their units to sale",
            self.disks_lost_runs, self.copies_lost
        );
        println!(
            "in the runs that kept their region, {} nodes lost their disks for good and were replaced \
             (surge ctl replace-node)",
            self.disks_replaced
        );
        println!("{} times a node's disk was slow for a while (10 to 1,500 ms more a write)", self.slow_disks);
        println!(
            "after those losses, the sampler promoted a copy again (a second failover) {} times, none overselling \
             or losing an acknowledgement unreported; {} times a failover would have refused it (no escrow grant)",
            self.second_failovers.promoted, self.second_failovers.refused
        );
    }
}

fn print_report(report: &sim::Report, wall: Duration) {
    let found = &report.found;
    let verdict = if report.passed() { "passed" } else { "FAILED" };
    println!(
        "seed {} {verdict}: {:.1} simulated s in {:.2} wall s, {} events, {} orders acknowledged, {} checkouts unanswered, trace {}",
        report.seed,
        found.simulated_ms as f64 / 1000.0,
        wall.as_secs_f64(),
        report.events,
        found.acked,
        found.unknown,
        &report.hash[..16]
    );
    if let Some(lost) = found.lost_reported {
        println!("  lost the primary region; the failover lost {lost} acknowledgements, reported");
    }
    for failure in &found.failures {
        println!("  {failure}");
    }
    if !report.passed() {
        println!("  replay: cargo run -p simulations --release -- --seed {} --trace", report.seed);
    }
}

/// A seed takes well under a second of wall time. One that takes
/// [`Watchdog::PATIENCE`] is stuck, most likely in a loop that never lets
/// simulated time pass, and a stuck run would otherwise hang CI until its
/// time limit with nothing said. The watchdog names the seed and the command
/// that replays it, and ends the process.
struct Watchdog {
    /// Dropped when the run ends, which tells the watchdog thread so.
    _done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    const PATIENCE: Duration = Duration::from_secs(120);

    fn start(seed: u64) -> Watchdog {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(Watchdog::PATIENCE) {
                println!("seed {seed} STUCK: still running after {} s of wall time", Watchdog::PATIENCE.as_secs());
                println!("  replay: cargo run -p simulations --release -- --seed {seed} --trace");
                std::process::exit(2);
            }
        });
        Watchdog { _done: done }
    }
}
