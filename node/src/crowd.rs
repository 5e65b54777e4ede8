//! The client side of `surge demo` and `surge bench`: a small HTTP client that
//! times every request, and a crowd of simulated shoppers that race for a
//! flash sale over real HTTP while keeping a ledger of every order the API
//! acknowledged, so that the demo can audit the server afterwards.
//!
//! This is a client tool, not simulated code: it reads the wall clock and may
//! use unseeded randomness for retry jitter. The crowd's *choices* (who buys
//! how much, who pays, who cancels) come from the seed alone, so a seed
//! replays the same crowd; the interleaving over the network does not.
//!
//! awc's client is `!Send`, so the load runs on threads of its own
//! ([`on_client_thread`]), each with its own actix system, apart from the
//! server's runtime: the load generator then competes with the node only for
//! CPU, never for the node's event loop.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use awc::http::Method;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// Longest a client waits for one response; a slower answer counts as a
/// transport error rather than hanging the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// API bodies are small JSON documents; a bigger one is a server bug.
const RESPONSE_BODY_BYTES_MAX: usize = 1 << 20;
/// Times a request shed with 503/429 is sent again before its caller sees
/// the overload answer.
const OVERLOAD_RETRIES_MAX: u32 = 8;
/// Times a checkout whose answer never arrived is sent again with the same
/// Idempotency-Key (which is what the key is for).
const CHECKOUT_SENDS_MAX: u32 = 3;
/// Unexpected answers kept verbatim for the summary; the rest are counted.
const UNEXPECTED_SAMPLES_MAX: usize = 20;
/// How often the stock watcher reads every SKU while the crowd runs.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

// ------------------------------------------------------------ threads --

/// Runs `make()` on a new OS thread inside an actix system of its own and
/// resolves to its output. The future may be `!Send` (awc's is); only the
/// closure that builds it and the output cross threads.
pub fn on_client_thread<F, Fut, T>(name: &str, make: F) -> impl Future<Output = anyhow::Result<T>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let output = actix_rt::System::new().block_on(make());
        // The receiver is gone only if the caller stopped waiting.
        let _ = tx.send(output);
    });
    let name = name.to_string();
    async move {
        spawned.with_context(|| format!("spawn client thread {name}"))?;
        rx.await.map_err(|_| anyhow!("client thread {name} panicked"))
    }
}

/// Milliseconds since the Unix epoch by this machine's clock, for sale windows.
pub fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

// --------------------------------------------------------------- HTTP --

/// What a run's requests did: every completed request's latency and status.
#[derive(Debug, Default)]
pub struct Stats {
    /// Whether completions count now. The bench leaves its warm-up out.
    pub recording: bool,
    /// One entry per completed request (any status), in microseconds.
    pub latencies_us: Vec<u32>,
    /// Completed requests by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no response (refused, reset, timed out).
    pub transport_errors: u64,
    /// 503/429 answers that were retried after a backoff.
    pub overload_retries: u64,
    /// Times a client moved to another endpoint because the one it used did
    /// not answer or shed load (a node down, cut off, or electing).
    pub failovers: u64,
}

impl Stats {
    pub fn recording() -> Stats {
        Stats { recording: true, ..Stats::default() }
    }

    pub fn requests(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Adds another thread's numbers to these.
    pub fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        for (status, count) in other.by_status {
            *self.by_status.entry(status).or_default() += count;
        }
        self.transport_errors += other.transport_errors;
        self.overload_retries += other.overload_retries;
        self.failovers += other.failovers;
    }

    /// Exact percentiles of all samples (nearest rank), in milliseconds.
    pub fn latency(&self) -> Latency {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let sum_us: u64 = sorted.iter().map(|&us| u64::from(us)).sum();
        Latency {
            p50_ms: percentile_ms(&sorted, 50.0),
            p99_ms: percentile_ms(&sorted, 99.0),
            p999_ms: percentile_ms(&sorted, 99.9),
            max_ms: sorted.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
            mean_ms: if sorted.is_empty() { 0.0 } else { sum_us as f64 / sorted.len() as f64 / 1000.0 },
        }
    }
}

/// Latency figures over one run's requests.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The nearest-rank percentile of sorted microsecond samples, in ms.
fn percentile_ms(sorted_us: &[u32], percent: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    (f64::from(sorted_us[index]) * 1000.0).round() / 1_000_000.0
}

/// One HTTP request to the API, described once so it can be sent again.
#[derive(Debug)]
pub struct Req<'a> {
    method: Method,
    path: String,
    bearer: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    body: Option<Value>,
    /// Whether its latency and status go into the run's statistics.
    recorded: bool,
    /// When a paced client meant to send it: its latency counts from then,
    /// so a server that makes clients fall behind schedule pays for the
    /// wait too (no coordinated omission).
    scheduled: Option<Instant>,
}

impl<'a> Req<'a> {
    fn new(method: Method, path: impl Into<String>, body: Option<Value>) -> Req<'a> {
        Req { method, path: path.into(), bearer: None, idempotency_key: None, body, recorded: true, scheduled: None }
    }

    pub fn get(path: impl Into<String>) -> Req<'a> {
        Req::new(Method::GET, path, None)
    }

    pub fn post(path: impl Into<String>, body: Option<Value>) -> Req<'a> {
        Req::new(Method::POST, path, body)
    }

    pub fn put(path: impl Into<String>, body: Value) -> Req<'a> {
        Req::new(Method::PUT, path, Some(body))
    }

    pub fn delete(path: impl Into<String>) -> Req<'a> {
        Req::new(Method::DELETE, path, None)
    }

    /// Sends `Authorization: Bearer <token>` (a session or operator token).
    /// Counts its latency from `at`, when it was meant to be sent.
    pub fn scheduled(mut self, at: Instant) -> Req<'a> {
        self.scheduled = Some(at);
        self
    }

    pub fn bearer(mut self, token: &'a str) -> Req<'a> {
        self.bearer = Some(token);
        self
    }

    pub fn idempotency_key(mut self, key: &'a str) -> Req<'a> {
        self.idempotency_key = Some(key);
        self
    }

    /// Leaves this request out of the statistics (setup a benchmark does
    /// not mean to measure).
    pub fn unrecorded(mut self) -> Req<'a> {
        self.recorded = false;
        self
    }

    /// `POST /v1/checkout`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The JSON body; `Null` when empty, a string when not JSON.
    pub body: Value,
    /// The `Idempotent-Replayed: true` header: a checkout answered from the
    /// idempotency record instead of being executed again.
    pub replayed: bool,
    /// The `Retry-After` header, in seconds.
    pub retry_after_s: Option<u64>,
    /// The `Surge-Stale-Ms` header of a read a DR replica served from its copy.
    pub stale_ms: Option<u64>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The problem slug, `sold-out` for `{"type":"/problems/sold-out"}`;
    /// empty when the body is not a problem document.
    pub fn problem(&self) -> &str {
        let kind = self.body.get("type").and_then(Value::as_str).unwrap_or("");
        kind.strip_prefix("/problems/").unwrap_or(kind)
    }

    pub fn is_problem(&self, status: u16, slug: &str) -> bool {
        self.status == status && self.problem() == slug
    }

    /// `409 sold-out: no units left of hot-sneaker`, for messages.
    pub fn describe(&self) -> String {
        match self.body.get("detail").and_then(Value::as_str) {
            Some(detail) => format!("{} {}: {}", self.status, self.problem(), detail),
            None => {
                let mut body = self.body.to_string();
                body.truncate(200);
                format!("{} {}", self.status, body)
            }
        }
    }

    /// A `u64` field of the body.
    pub fn u64_field(&self, name: &str) -> Option<u64> {
        self.body.get(name).and_then(Value::as_u64)
    }
}

/// An API client for one worker: its own awc client, so its own keep-alive
/// connection(s); the statistics are shared by the workers of a run.
#[derive(Clone)]
pub struct Http {
    client: awc::Client,
    /// Base URLs of the nodes this client may use. It uses one at a time and
    /// moves to the next when that one does not answer or sheds load, as a
    /// shopper's client fails over between regional endpoints.
    endpoints: Rc<[Rc<str>]>,
    current: Cell<usize>,
    stats: Rc<RefCell<Stats>>,
}

impl Http {
    pub fn new(base_url: &str, stats: Rc<RefCell<Stats>>) -> Http {
        Http::spread(&[base_url.to_string()], 0, stats)
    }

    /// A client over several endpoints that starts with `endpoints[first %
    /// len]`, so a crowd's clients spread over all of them.
    pub fn spread(endpoints: &[String], first: usize, stats: Rc<RefCell<Stats>>) -> Http {
        assert!(!endpoints.is_empty(), "a client needs an endpoint");
        let client = awc::Client::builder().timeout(REQUEST_TIMEOUT).finish();
        let endpoints: Rc<[Rc<str>]> = endpoints.iter().map(|url| url.trim_end_matches('/').into()).collect();
        let current = Cell::new(first % endpoints.len());
        Http { client, endpoints, current, stats }
    }

    /// A client whose requests are not counted (setup, audits, the watcher).
    pub fn unrecorded(base_url: &str) -> Http {
        Http::new(base_url, Rc::new(RefCell::new(Stats::default())))
    }

    /// Moves to the next endpoint, if there is another.
    fn fail_over(&self) {
        if self.endpoints.len() > 1 {
            self.current.set((self.current.get() + 1) % self.endpoints.len());
            self.stats.borrow_mut().failovers += 1;
        }
    }

    /// Sends once and records the outcome. `Err` is a transport failure:
    /// no response, so the request may or may not have taken effect.
    pub async fn send(&self, req: &Req<'_>) -> Result<Reply, String> {
        let base_url = &self.endpoints[self.current.get()];
        let mut request = self.client.request(req.method.clone(), format!("{base_url}{}", req.path));
        if let Some(token) = req.bearer {
            request = request.bearer_auth(token);
        }
        if let Some(key) = req.idempotency_key {
            request = request.insert_header(("Idempotency-Key", key));
        }
        let started = req.scheduled.unwrap_or_else(Instant::now);
        let sent = match &req.body {
            Some(body) => request.send_json(body).await,
            None => request.send().await,
        };
        let result = match sent {
            Err(error) => Err(error.to_string()),
            Ok(mut response) => {
                let status = response.status().as_u16();
                let headers = response.headers();
                let replayed = headers
                    .get("idempotent-replayed")
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|value| value.eq_ignore_ascii_case("true"));
                let number = |name: &str| {
                    headers.get(name).and_then(|value| value.to_str().ok()).and_then(|value| value.trim().parse().ok())
                };
                let retry_after_s = number("retry-after");
                let stale_ms = number("surge-stale-ms");
                match response.body().limit(RESPONSE_BODY_BYTES_MAX).await {
                    Err(error) => Err(format!("read response body: {error}")),
                    Ok(bytes) => {
                        let body = if bytes.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(&bytes)
                                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
                        };
                        Ok(Reply { status, body, replayed, retry_after_s, stale_ms })
                    }
                }
            }
        };
        let latency_us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut stats = self.stats.borrow_mut();
        if stats.recording && req.recorded {
            match &result {
                Ok(reply) => {
                    stats.latencies_us.push(latency_us);
                    *stats.by_status.entry(reply.status).or_default() += 1;
                }
                Err(_) => stats.transport_errors += 1,
            }
        }
        result
    }

    /// Sends, and sends again after a short backoff while the server sheds
    /// load (503/429), as a polite client does, moving to the next endpoint
    /// first. The same request is resent, so a checkout keeps its
    /// Idempotency-Key. After no answer at all it moves on too, but leaves
    /// resending to the caller, who knows whether that is safe.
    pub async fn call(&self, req: &Req<'_>) -> Result<Reply, String> {
        let mut retries = 0;
        loop {
            let reply = match self.send(req).await {
                Ok(reply) => reply,
                Err(error) => {
                    self.fail_over();
                    return Err(error);
                }
            };
            if !matches!(reply.status, 429 | 503) || retries >= OVERLOAD_RETRIES_MAX {
                return Ok(reply);
            }
            self.fail_over();
            self.stats.borrow_mut().overload_retries += 1;
            actix_rt::time::sleep(overload_backoff(retries, reply.retry_after_s)).await;
            retries += 1;
        }
    }
}

/// Exponential from 20 ms, capped by the server's Retry-After and by 640 ms,
/// with jitter so that shed clients do not come back in lockstep.
fn overload_backoff(retries: u32, retry_after_s: Option<u64>) -> Duration {
    let exponential_ms = 20u64 << retries.min(5);
    let capped_ms = retry_after_s.map_or(exponential_ms, |s| exponential_ms.min(s.saturating_mul(1000))).max(5);
    Duration::from_millis(capped_ms + rand::thread_rng().gen_range(0..=capped_ms / 2))
}

// -------------------------------------------------------------- crowd --

/// What the crowd does; everything it chooses is drawn from `seed`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub shoppers: usize,
    /// Shoppers active at once (one keep-alive client each).
    pub concurrency: usize,
    /// No shopper starts after this, and shoppers under way stop thinking.
    pub duration: Duration,
    /// The flash-sale SKU everyone wants.
    pub hot_sku: String,
    /// Its per-shopper limit (0: none).
    pub hot_limit: u32,
    /// Other SKUs some shoppers add to their order.
    pub cold_skus: Vec<String>,
    /// Longest pause between placing an order and paying or cancelling it.
    pub think_ms_max: u64,
}

/// The last state of an order that the API acknowledged to its shopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckedStatus {
    PendingPayment,
    Paid,
    Cancelled,
}

/// An order the API acknowledged, as the shopper remembers it.
#[derive(Clone, Debug)]
pub struct Acked {
    pub order_id: u64,
    /// Index of the shopper: per-shopper limits are audited with it.
    pub shopper: usize,
    /// The shopper's session token: only it may read the order back.
    pub token: String,
    /// (sku, qty), sorted by sku.
    pub items: Vec<(String, u32)>,
    pub status: AckedStatus,
    /// A payment was sent, whatever came back: the order may be paid even if
    /// the acknowledgement was lost on the way.
    pub pay_attempted: bool,
    /// The same for a cancel.
    pub cancel_attempted: bool,
}

/// What the shoppers did and what the API answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// Shoppers who got a session.
    pub shoppers_served: u64,
    /// Checkout attempts, each with its own Idempotency-Key.
    pub checkouts: u64,
    /// Distinct orders acknowledged (201/200 with an order).
    pub orders_placed: u64,
    pub refused_sold_out: u64,
    pub refused_limit: u64,
    pub refused_sale_closed: u64,
    /// Shoppers who came back once after "sold out" (units return when
    /// others cancel or let their holds expire).
    pub came_back: u64,
    pub payments_declined: u64,
    pub payments_approved: u64,
    /// Payments refused because the hold had already expired.
    pub payments_too_late: u64,
    pub cancels: u64,
    pub cancels_too_late: u64,
    /// Orders left unpaid on purpose: their holds must expire.
    pub abandoned: u64,
    /// Checkouts sent again with the same key, answered with the same order.
    pub replays_checked: u64,
    /// Same key, different answer: an idempotency failure.
    pub replay_mismatches: u64,
    /// Two identical checkouts sent at once (a double click).
    pub double_submits: u64,
    /// Checkouts for more than the per-shopper limit on top of an order.
    pub limit_probes: u64,
    /// ... that the API refused as over the limit (the others met "sold
    /// out" first, which is also a fine answer).
    pub limit_probes_refused: u64,
    /// ... that the API accepted: a limit failure.
    pub limit_violations: u64,
    /// Checkouts with no answer even after resending with the same key.
    pub checkouts_unanswered: u64,
    /// Answers the API contract does not allow for that request.
    pub unexpected: u64,
}

/// What the stock watcher saw while the crowd ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Watch {
    pub reads: u64,
    /// Largest `sold + held - total` in any read (0 when never oversold).
    pub oversell_max: u64,
    /// Reads where `available + held + sold + unsettled != total`.
    pub conservation_violations: u64,
}

/// Everything a crowd run produced.
#[derive(Debug)]
pub struct CrowdReport {
    pub counters: Counters,
    pub ledger: Vec<Acked>,
    pub stats: Stats,
    /// From the first shopper's start to the last shopper's end.
    pub wall: Duration,
    pub watch: Watch,
    /// The first few unexpected answers, verbatim.
    pub unexpected_samples: Vec<String>,
    /// The order each unexpected answer to a payment or a cancellation was
    /// about: after a forced failover, an order the promoted region never
    /// heard of is reported, not unexpected.
    pub unexpected_orders: Vec<u64>,
    /// The session each unexpected 401 was about: after a forced failover,
    /// a session the promoted region never heard of is reported too.
    pub unexpected_sessions: Vec<u64>,
    /// For each limit probe the API accepted, the shopper's earlier order:
    /// after a forced failover, a limit counted without an order the
    /// promoted region never heard of is what the report said could happen.
    pub limit_passes: Vec<u64>,
}

/// State shared by the crowd's workers (one thread, so `Cell`/`RefCell`).
struct Crowd {
    plan: Plan,
    endpoints: Vec<String>,
    deadline: Instant,
    next_shopper: Cell<usize>,
    counters: RefCell<Counters>,
    ledger: RefCell<Vec<Acked>>,
    samples: RefCell<Vec<String>>,
    /// The order each unexpected answer about an order was about.
    unexpected_orders: RefCell<Vec<u64>>,
    /// Session ids by token, as the API opened them.
    sessions: RefCell<HashMap<String, u64>>,
    /// The session each unexpected 401 was about.
    unexpected_sessions: RefCell<Vec<u64>>,
    /// The earlier order of each limit probe the API accepted.
    limit_passes: RefCell<Vec<u64>>,
    progress: ProgressBar,
}

impl Crowd {
    fn take_shopper(&self) -> Option<usize> {
        let index = self.next_shopper.get();
        if index >= self.plan.shoppers || Instant::now() >= self.deadline {
            return None;
        }
        self.next_shopper.set(index + 1);
        Some(index)
    }

    fn count(&self, bump: impl FnOnce(&mut Counters)) {
        bump(&mut self.counters.borrow_mut());
    }

    fn unexpected(&self, req: &Req<'_>, what: &str) {
        self.count(|c| c.unexpected += 1);
        let mut samples = self.samples.borrow_mut();
        if samples.len() < UNEXPECTED_SAMPLES_MAX {
            samples.push(format!("{} -> {what}", req.describe()));
        }
    }

    /// An unexpected `reply` to `req`. A 401 to a token the API gave out is
    /// noted by session: a forced failover may lose the session, and its
    /// report names the ids it may have lost.
    fn unexpected_reply(&self, req: &Req<'_>, reply: &Reply) {
        let session = req.bearer.and_then(|token| self.sessions.borrow().get(token).copied());
        if let (401, Some(session)) = (reply.status, session) {
            self.unexpected_sessions.borrow_mut().push(session);
        }
        self.unexpected(req, &reply.describe());
    }

    /// An unexpected answer about order `order_id`.
    fn unexpected_about(&self, order_id: u64, req: &Req<'_>, what: &str) {
        self.unexpected_orders.borrow_mut().push(order_id);
        self.unexpected(req, what);
    }

    fn acknowledge(&self, shopper: usize, token: &str, placed: &Placed) -> usize {
        self.count(|c| c.orders_placed += 1);
        let mut ledger = self.ledger.borrow_mut();
        ledger.push(Acked {
            order_id: placed.order_id,
            shopper,
            token: token.to_string(),
            items: placed.items.clone(),
            status: AckedStatus::PendingPayment,
            pay_attempted: false,
            cancel_attempted: false,
        });
        ledger.len() - 1
    }

    fn update(&self, entry: usize, change: impl FnOnce(&mut Acked)) {
        change(&mut self.ledger.borrow_mut()[entry]);
    }

    fn shopper_done(&self) {
        self.progress.inc(1);
        let c = self.counters.borrow();
        self.progress.set_message(format!(
            "orders {} · paid {} · cancelled {} · sold out {}",
            c.orders_placed, c.payments_approved, c.cancels, c.refused_sold_out
        ));
    }

    /// Sleeps unless the crowd's time is up; false when it is.
    async fn think(&self, ms: u64) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        actix_rt::time::sleep(Duration::from_millis(ms)).await;
        true
    }
}

/// Runs the crowd on the current (client) thread against `endpoints`,
/// its shoppers spread over all of them.
pub async fn run(endpoints: &[String], plan: Plan, progress: ProgressBar) -> CrowdReport {
    let started = Instant::now();
    let crowd = Crowd {
        deadline: started + plan.duration,
        plan,
        endpoints: endpoints.to_vec(),
        next_shopper: Cell::new(0),
        counters: RefCell::default(),
        ledger: RefCell::default(),
        samples: RefCell::default(),
        unexpected_orders: RefCell::default(),
        sessions: RefCell::default(),
        unexpected_sessions: RefCell::default(),
        limit_passes: RefCell::default(),
        progress,
    };
    let stats = Rc::new(RefCell::new(Stats::recording()));
    let done = Cell::new(false);
    let workers = (0..crowd.plan.concurrency.max(1)).map(|worker| {
        let http = Http::spread(endpoints, worker, stats.clone());
        let crowd = &crowd;
        async move {
            while let Some(index) = crowd.take_shopper() {
                shopper(crowd, &http, index).await;
                crowd.shopper_done();
            }
        }
    });
    let shoppers = async {
        futures::future::join_all(workers).await;
        done.set(true);
        started.elapsed()
    };
    let (wall, watch) = futures::join!(shoppers, watch_stock(&crowd, &done));
    crowd.progress.finish_and_clear();
    let stats = std::mem::take(&mut *stats.borrow_mut());
    CrowdReport {
        counters: crowd.counters.into_inner(),
        ledger: crowd.ledger.into_inner(),
        stats,
        wall,
        watch,
        unexpected_samples: crowd.samples.into_inner(),
        unexpected_orders: crowd.unexpected_orders.into_inner(),
        unexpected_sessions: crowd.unexpected_sessions.into_inner(),
        limit_passes: crowd.limit_passes.into_inner(),
    }
}

/// Reads every SKU over and over while the crowd runs and checks the stock
/// invariants in each read: an oversell must not exist even for a moment.
async fn watch_stock(crowd: &Crowd, done: &Cell<bool>) -> Watch {
    let http = Http::spread(&crowd.endpoints, 0, Rc::new(RefCell::new(Stats::default())));
    let mut watch = Watch::default();
    let skus: Vec<&String> = std::iter::once(&crowd.plan.hot_sku).chain(&crowd.plan.cold_skus).collect();
    while !done.get() {
        for sku in &skus {
            let req = Req::get(format!("/v1/skus/{sku}"));
            match http.call(&req).await {
                Ok(reply) if reply.status == 200 => match StockRead::from_reply(&reply) {
                    Some(read) => {
                        watch.reads += 1;
                        watch.oversell_max = watch.oversell_max.max(read.oversell());
                        if !read.conserved() {
                            watch.conservation_violations += 1;
                        }
                    }
                    None => crowd.unexpected(&req, &format!("unreadable SKU: {}", reply.body)),
                },
                Ok(reply) => crowd.unexpected(&req, &reply.describe()),
                // A lost read proves nothing either way; the next one counts.
                Err(_) => {}
            }
        }
        actix_rt::time::sleep(WATCH_INTERVAL).await;
    }
    watch
}

/// A SKU's stock as one `GET /v1/skus/{sku}` showed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StockRead {
    pub sku: String,
    pub total: u64,
    pub available: u64,
    pub held: u64,
    pub sold: u64,
    pub unsettled: u64,
}

impl StockRead {
    pub fn from_reply(reply: &Reply) -> Option<StockRead> {
        Some(StockRead {
            sku: reply.body.get("sku")?.as_str()?.to_string(),
            total: reply.u64_field("total")?,
            available: reply.u64_field("available")?,
            held: reply.u64_field("held")?,
            sold: reply.u64_field("sold")?,
            unsettled: reply.u64_field("unsettled")?,
        })
    }

    /// Units sold or held beyond the stock.
    pub fn oversell(&self) -> u64 {
        (self.sold + self.held).saturating_sub(self.total)
    }

    pub fn conserved(&self) -> bool {
        [self.held, self.sold, self.unsettled].into_iter().try_fold(self.available, u64::checked_add)
            == Some(self.total)
    }
}

/// What a paying shopper does first.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Pays; with `Some(token)`, first with a card that is declined.
    Pay(Option<&'static str>),
    Cancel,
    /// Walks away; the hold must expire on its own.
    Abandon,
}

/// How a shopper re-sends its checkout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resend {
    No,
    /// Sends the same checkout again after the answer (a client retry).
    After,
    /// Sends it twice at once (a double click).
    Concurrent,
}

/// One shopper's choices, all drawn up front so they depend on the seed and
/// the shopper's index only, never on what the server answered.
#[derive(Debug)]
struct Choices {
    hot_qty: u32,
    /// Some((cold sku index, qty)).
    cold: Option<(usize, u32)>,
    /// Fills the cart and checks it out, rather than sending `items`.
    via_cart: bool,
    /// Adds a cold item to the cart and removes it again first.
    edits_cart: bool,
    fate: Fate,
    resend: Resend,
    /// After an order, tries to buy past the per-shopper limit.
    probes_limit: bool,
    /// Comes back once after "sold out".
    persistent: bool,
    think_ms: u64,
    come_back_ms: u64,
}

impl Choices {
    fn draw(plan: &Plan, shopper: usize) -> Choices {
        let mut rng = StdRng::seed_from_u64(plan.seed ^ (shopper as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut hot_qty = if rng.gen_bool(0.6) { 1 } else { 2 };
        if plan.hot_limit > 0 {
            hot_qty = hot_qty.min(plan.hot_limit);
        }
        let cold = (!plan.cold_skus.is_empty() && rng.gen_bool(0.25))
            .then(|| (rng.gen_range(0..plan.cold_skus.len()), rng.gen_range(1..=2)));
        let via_cart = rng.gen_bool(0.5);
        let edits_cart = via_cart && !plan.cold_skus.is_empty() && rng.gen_bool(0.15);
        let fate = match rng.gen_range(0..100) {
            0..60 => match rng.gen_range(0..100) {
                0..15 => Fate::Pay(Some("tok_decline")),
                15..25 => Fate::Pay(Some("tok_insufficient_funds")),
                _ => Fate::Pay(None),
            },
            60..75 => Fate::Cancel,
            _ => Fate::Abandon,
        };
        let resend = match rng.gen_range(0..100) {
            0..8 => Resend::After,
            8..13 => Resend::Concurrent,
            _ => Resend::No,
        };
        Choices {
            hot_qty,
            cold,
            via_cart,
            edits_cart,
            fate,
            resend,
            probes_limit: plan.hot_limit > 0 && rng.gen_bool(0.08),
            persistent: rng.gen_bool(0.3),
            think_ms: rng.gen_range(0..=plan.think_ms_max),
            come_back_ms: rng.gen_range(300..=1500),
        }
    }

    /// The order's lines, sorted by sku like the ledger's.
    fn lines(&self, plan: &Plan) -> Vec<(String, u32)> {
        let mut lines = vec![(plan.hot_sku.clone(), self.hot_qty)];
        if let Some((cold, qty)) = self.cold {
            lines.push((plan.cold_skus[cold].clone(), qty));
        }
        lines.sort();
        lines
    }
}

fn items_json(lines: &[(String, u32)]) -> Value {
    Value::Array(lines.iter().map(|(sku, qty)| json!({ "sku": sku, "qty": qty })).collect())
}

/// An order as the API showed it.
#[derive(Debug)]
pub struct Placed {
    pub order_id: u64,
    pub status: String,
    /// (sku, qty), sorted by sku.
    pub items: Vec<(String, u32)>,
    /// Answered from the idempotency record (a checkout replay).
    pub replayed: bool,
}

impl Placed {
    pub fn from_reply(reply: &Reply) -> Option<Placed> {
        let mut items = Vec::new();
        for item in reply.body.get("items")?.as_array()? {
            let qty = u32::try_from(item.get("qty")?.as_u64()?).ok()?;
            items.push((item.get("sku")?.as_str()?.to_string(), qty));
        }
        items.sort();
        Some(Placed {
            order_id: reply.u64_field("order_id")?,
            status: reply.body.get("status")?.as_str()?.to_string(),
            items,
            replayed: reply.replayed,
        })
    }
}

/// How a checkout ended.
#[derive(Debug)]
enum Checkout {
    Placed(Placed),
    /// A 409 problem: `sold-out`, `limit-exceeded`, `sale-not-open`, ...
    Refused(String),
    /// No usable answer (already counted as unexpected or unanswered).
    Unknown,
}

/// `POST /v1/checkout`, resent with the same key when no answer came back.
async fn checkout(crowd: &Crowd, http: &Http, token: &str, key: &str, body: Option<&Value>) -> Checkout {
    let req = Req::post("/v1/checkout", body.cloned()).bearer(token).idempotency_key(key);
    for _ in 0..CHECKOUT_SENDS_MAX {
        match http.call(&req).await {
            Ok(reply) if matches!(reply.status, 200 | 201) => {
                return match Placed::from_reply(&reply) {
                    Some(placed) => Checkout::Placed(placed),
                    None => {
                        crowd.unexpected(&req, &format!("{} with an unreadable order: {}", reply.status, reply.body));
                        Checkout::Unknown
                    }
                };
            }
            Ok(reply) if reply.status == 409 => return Checkout::Refused(reply.problem().to_string()),
            Ok(reply) => {
                crowd.unexpected_reply(&req, &reply);
                return Checkout::Unknown;
            }
            Err(_) => actix_rt::time::sleep(Duration::from_millis(50)).await,
        }
    }
    crowd.count(|c| c.checkouts_unanswered += 1);
    Checkout::Unknown
}

/// Counts a refusal of a shopper's checkout; false if the refusal is not
/// one the API may give.
fn count_refusal(crowd: &Crowd, slug: &str) -> bool {
    match slug {
        "sold-out" => crowd.count(|c| c.refused_sold_out += 1),
        "limit-exceeded" => crowd.count(|c| c.refused_limit += 1),
        "sale-not-open" | "sale-ended" => crowd.count(|c| c.refused_sale_closed += 1),
        _ => return false,
    }
    true
}

/// One shopper, start to finish.
async fn shopper(crowd: &Crowd, http: &Http, index: usize) {
    let plan = &crowd.plan;
    let choices = Choices::draw(plan, index);
    let lines = choices.lines(plan);

    let req = Req::post("/v1/sessions", Some(json!({ "shopper": format!("shopper-{index}") })));
    let token = match http.call(&req).await {
        Ok(reply) if reply.status == 201 => {
            let session = reply.body.get("session_id").and_then(Value::as_u64);
            match (reply.body.get("token").and_then(Value::as_str), session) {
                (Some(token), Some(session)) => {
                    crowd.sessions.borrow_mut().insert(token.to_string(), session);
                    token.to_string()
                }
                _ => return crowd.unexpected(&req, &format!("201 without a token or session id: {}", reply.body)),
            }
        }
        Ok(reply) => return crowd.unexpected(&req, &reply.describe()),
        Err(_) => return,
    };
    crowd.count(|c| c.shoppers_served += 1);

    let mut body = if choices.via_cart {
        if !fill_cart(crowd, http, &token, &choices, &lines).await {
            return;
        }
        None
    } else {
        Some(json!({ "items": items_json(&lines) }))
    };

    // Check out; a persistent shopper comes back once after "sold out".
    let mut attempt = 0;
    let (entry, order_id, key) = loop {
        let key = format!("demo-{:x}-{index}-{attempt}", plan.seed);
        crowd.count(|c| c.checkouts += 1);
        let outcome = if choices.resend == Resend::Concurrent && attempt == 0 {
            double_submit(crowd, http, index, &token, &key, body.as_ref()).await
        } else {
            checkout(crowd, http, &token, &key, body.as_ref()).await
        };
        match outcome {
            Checkout::Placed(placed) => {
                let req = Req::post("/v1/checkout", None);
                if placed.status != "pending_payment" {
                    crowd.unexpected(&req, &format!("new order {} is {}", placed.order_id, placed.status));
                }
                if placed.items != lines {
                    crowd.unexpected(
                        &req,
                        &format!("ordered {lines:?}, order {} has {:?}", placed.order_id, placed.items),
                    );
                }
                break (crowd.acknowledge(index, &token, &placed), placed.order_id, key);
            }
            Checkout::Refused(slug) => {
                if !count_refusal(crowd, &slug) {
                    crowd.unexpected(&Req::post("/v1/checkout", None), &format!("409 {slug}"));
                    return;
                }
                if slug != "sold-out" || !choices.persistent || attempt > 0 || !crowd.think(choices.come_back_ms).await
                {
                    return;
                }
                crowd.count(|c| c.came_back += 1);
                attempt += 1;
                // Whether a refused cart checkout leaves the cart as it was is
                // not part of the contract, so the second try names its items.
                body = Some(json!({ "items": items_json(&lines) }));
            }
            Checkout::Unknown => return,
        }
    };

    if choices.resend == Resend::After {
        replay(crowd, http, &token, &key, body.as_ref(), order_id).await;
    }
    if choices.probes_limit {
        probe_limit(crowd, http, index, &token, &choices, order_id).await;
    }

    if !crowd.think(choices.think_ms).await {
        crowd.count(|c| c.abandoned += 1);
        return;
    }
    match choices.fate {
        Fate::Pay(declined_first) => pay(crowd, http, &token, entry, order_id, declined_first).await,
        Fate::Cancel => cancel(crowd, http, &token, entry, order_id).await,
        Fate::Abandon => crowd.count(|c| c.abandoned += 1),
    }
}

/// Puts the lines in the cart (after an edit, for some) and checks that the
/// cart reads back as exactly those lines. False if the cart is unusable.
async fn fill_cart(crowd: &Crowd, http: &Http, token: &str, choices: &Choices, lines: &[(String, u32)]) -> bool {
    let mut steps = Vec::new();
    if choices.edits_cart {
        let cold = &crowd.plan.cold_skus[0];
        steps.push(Req::put(format!("/v1/cart/items/{cold}"), json!({ "qty": 1 })).bearer(token));
        steps.push(Req::delete(format!("/v1/cart/items/{cold}")).bearer(token));
    }
    for (sku, qty) in lines {
        steps.push(Req::put(format!("/v1/cart/items/{sku}"), json!({ "qty": qty })).bearer(token));
    }
    for req in &steps {
        match http.call(req).await {
            Ok(reply) if reply.is_success() => {}
            Ok(reply) => {
                crowd.unexpected(req, &reply.describe());
                return false;
            }
            Err(_) => return false,
        }
    }
    let req = Req::get("/v1/cart").bearer(token);
    match http.call(&req).await {
        Ok(reply) if reply.status == 200 => {
            let mut cart: Vec<(String, u32)> = reply
                .body
                .get("items")
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| {
                            let qty = u32::try_from(item.get("qty")?.as_u64()?).ok()?;
                            Some((item.get("sku")?.as_str()?.to_string(), qty))
                        })
                        .collect()
                })
                .unwrap_or_default();
            cart.sort();
            if cart != lines {
                crowd.unexpected(&req, &format!("cart should be {lines:?}, is {cart:?}"));
            }
            true
        }
        Ok(reply) => {
            crowd.unexpected_reply(&req, &reply);
            true
        }
        Err(_) => true,
    }
}

/// Sends the same checkout twice at once. Both answers must be the same
/// order, or one of them a refusal that does not contradict it.
async fn double_submit(
    crowd: &Crowd,
    http: &Http,
    index: usize,
    token: &str,
    key: &str,
    body: Option<&Value>,
) -> Checkout {
    crowd.count(|c| c.double_submits += 1);
    let (first, second) =
        futures::join!(checkout(crowd, http, token, key, body), checkout(crowd, http, token, key, body));
    let req = Req::post("/v1/checkout", None);
    match (first, second) {
        (Checkout::Placed(a), Checkout::Placed(b)) => {
            crowd.count(|c| c.replays_checked += 1);
            if a.order_id != b.order_id {
                crowd.count(|c| c.replay_mismatches += 1);
                crowd.unexpected(&req, &format!("one key, two orders: {} and {}", a.order_id, b.order_id));
                // Both were acknowledged; the ledger holds the second one too.
                crowd.acknowledge(index, token, &b);
            }
            Checkout::Placed(a)
        }
        (Checkout::Placed(placed), Checkout::Refused(slug)) | (Checkout::Refused(slug), Checkout::Placed(placed)) => {
            // A key that produced an order must never be refused for stock or
            // limits: a client retrying after a timeout would give up an order
            // it has. A "request in progress" style refusal is fine.
            if matches!(slug.as_str(), "sold-out" | "limit-exceeded" | "sale-not-open" | "sale-ended") {
                crowd.count(|c| c.replay_mismatches += 1);
                crowd.unexpected(&req, &format!("same key: order {} and 409 {slug}", placed.order_id));
            }
            Checkout::Placed(placed)
        }
        (Checkout::Refused(a), Checkout::Refused(_)) => Checkout::Refused(a),
        (Checkout::Placed(placed), Checkout::Unknown) | (Checkout::Unknown, Checkout::Placed(placed)) => {
            Checkout::Placed(placed)
        }
        (Checkout::Refused(slug), Checkout::Unknown) | (Checkout::Unknown, Checkout::Refused(slug)) => {
            Checkout::Refused(slug)
        }
        (Checkout::Unknown, Checkout::Unknown) => Checkout::Unknown,
    }
}

/// Sends a checkout again with its key: the answer must be the same order,
/// marked as replayed.
async fn replay(crowd: &Crowd, http: &Http, token: &str, key: &str, body: Option<&Value>, order_id: u64) {
    crowd.count(|c| c.replays_checked += 1);
    let req = Req::post("/v1/checkout", None);
    match checkout(crowd, http, token, key, body).await {
        Checkout::Placed(again) if again.order_id == order_id => {
            if !again.replayed {
                crowd.unexpected(&req, &format!("replay of order {order_id} without Idempotent-Replayed: true"));
            }
        }
        Checkout::Placed(again) => {
            crowd.count(|c| c.replay_mismatches += 1);
            crowd.unexpected(&req, &format!("replay of order {order_id} answered order {}", again.order_id));
        }
        Checkout::Refused(slug) => {
            crowd.count(|c| c.replay_mismatches += 1);
            crowd.unexpected(&req, &format!("replay of order {order_id} answered 409 {slug}"));
        }
        Checkout::Unknown => {}
    }
}

/// With order `earlier` already holding `hot_qty` units, asks for enough
/// more to pass the per-shopper limit: the API must refuse.
async fn probe_limit(crowd: &Crowd, http: &Http, index: usize, token: &str, choices: &Choices, earlier: u64) {
    let plan = &crowd.plan;
    crowd.count(|c| c.limit_probes += 1);
    let extra = plan.hot_limit - choices.hot_qty + 1;
    let lines = vec![(plan.hot_sku.clone(), extra)];
    let body = json!({ "items": items_json(&lines) });
    let key = format!("demo-{:x}-{index}-probe", plan.seed);
    match checkout(crowd, http, token, &key, Some(&body)).await {
        Checkout::Placed(placed) => {
            crowd.count(|c| c.limit_violations += 1);
            crowd.limit_passes.borrow_mut().push(earlier);
            crowd.unexpected_about(
                earlier,
                &Req::post("/v1/checkout", None),
                &format!(
                    "limit {} passed after order {earlier}: order {} for {extra} more",
                    plan.hot_limit, placed.order_id
                ),
            );
            crowd.acknowledge(index, token, &placed);
        }
        // Sold out is a fine answer too: the stock check may come first.
        Checkout::Refused(slug) if slug == "limit-exceeded" => crowd.count(|c| c.limit_probes_refused += 1),
        Checkout::Refused(slug) if slug == "sold-out" => {}
        Checkout::Refused(slug) => {
            crowd.unexpected(&Req::post("/v1/checkout", None), &format!("limit probe: 409 {slug}"))
        }
        Checkout::Unknown => {}
    }
}

/// Pays an order, first with a declined card for some shoppers.
async fn pay(
    crowd: &Crowd,
    http: &Http,
    token: &str,
    entry: usize,
    order_id: u64,
    declined_first: Option<&'static str>,
) {
    let path = format!("/v1/orders/{order_id}/pay");
    crowd.update(entry, |acked| acked.pay_attempted = true);
    if let Some(card) = declined_first {
        let req = Req::post(path.clone(), Some(json!({ "payment_token": card }))).bearer(token);
        match http.call(&req).await {
            Ok(reply) if reply.is_problem(402, "payment-declined") => crowd.count(|c| c.payments_declined += 1),
            Ok(reply) if reply.is_problem(409, "order-final") => return crowd.count(|c| c.payments_too_late += 1),
            Ok(reply) => return crowd.unexpected_about(order_id, &req, &reply.describe()),
            Err(_) => return,
        }
        // A declined payment leaves the order waiting for another try.
        let req = Req::get(format!("/v1/orders/{order_id}")).bearer(token);
        match http.call(&req).await {
            Ok(reply) if reply.status == 200 => {
                let status = reply.body.get("status").and_then(Value::as_str).unwrap_or("");
                if status != "pending_payment" && status != "expired" {
                    crowd.unexpected_about(
                        order_id,
                        &req,
                        &format!("after a declined payment the order is {status:?}"),
                    );
                }
            }
            Ok(reply) => crowd.unexpected_about(order_id, &req, &reply.describe()),
            Err(_) => {}
        }
    }
    let req = Req::post(path, Some(json!({ "payment_token": "tok_approve" }))).bearer(token);
    match http.call(&req).await {
        Ok(reply) if reply.status == 200 => {
            if reply.body.get("status").and_then(Value::as_str) == Some("paid") {
                crowd.count(|c| c.payments_approved += 1);
                crowd.update(entry, |acked| acked.status = AckedStatus::Paid);
            } else {
                crowd.unexpected_about(order_id, &req, &format!("200 but not paid: {}", reply.body));
            }
        }
        Ok(reply) if reply.is_problem(409, "order-final") => crowd.count(|c| c.payments_too_late += 1),
        Ok(reply) => crowd.unexpected_about(order_id, &req, &reply.describe()),
        Err(_) => {}
    }
}

async fn cancel(crowd: &Crowd, http: &Http, token: &str, entry: usize, order_id: u64) {
    crowd.update(entry, |acked| acked.cancel_attempted = true);
    let req = Req::post(format!("/v1/orders/{order_id}/cancel"), None).bearer(token);
    match http.call(&req).await {
        Ok(reply) if reply.status == 200 => {
            if reply.body.get("status").and_then(Value::as_str) == Some("cancelled") {
                crowd.count(|c| c.cancels += 1);
                crowd.update(entry, |acked| acked.status = AckedStatus::Cancelled);
            } else {
                crowd.unexpected_about(order_id, &req, &format!("200 but not cancelled: {}", reply.body));
            }
        }
        Ok(reply) if reply.is_problem(409, "order-final") => crowd.count(|c| c.cancels_too_late += 1),
        Ok(reply) => crowd.unexpected_about(order_id, &req, &reply.describe()),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&samples, 50.0), 50.0);
        assert_eq!(percentile_ms(&samples, 99.0), 99.0);
        assert_eq!(percentile_ms(&samples, 100.0), 100.0);
        assert_eq!(percentile_ms(&[1500], 99.0), 1.5);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }

    #[test]
    fn choices_depend_on_seed_and_shopper_only() {
        let plan = Plan {
            seed: 7,
            shoppers: 10,
            concurrency: 2,
            duration: Duration::from_secs(1),
            hot_sku: "hot".into(),
            hot_limit: 2,
            cold_skus: vec!["a".into(), "b".into()],
            think_ms_max: 100,
        };
        for shopper in 0..100 {
            let (a, b) = (Choices::draw(&plan, shopper), Choices::draw(&plan, shopper));
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
            assert!(a.hot_qty >= 1 && a.hot_qty <= plan.hot_limit);
        }
    }
}
