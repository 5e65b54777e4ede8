//! The SKU actor (a batching proposer) and the session actor, and the
//! registry that activates them on first use and forgets them once they
//! passivate.
//!
//! Both are thin shells: the decisions are `domain::GroupState`'s. What the
//! actors add is order and batching. A session actor runs its shopper's
//! commands one at a time, in arrival order. A SKU actor collects the commands
//! that arrive while its previous proposal is in flight and proposes them as
//! one log entry, so a hot SKU costs one Raft round trip per batch, not one
//! per shopper.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use domain::{Command, Outcome, SessionId};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::group::Group;
use crate::ProposeError;

/// Bounds and timings of the actors: the `[actors]` table of a node's config.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorLimits {
    /// Messages an actor's mailbox holds before senders are told to back off.
    pub mailbox_max: usize,
    /// Commands a SKU actor queues behind its in-flight proposal.
    pub queue_max: usize,
    /// Commands in one log entry.
    pub batch_max: usize,
    /// Log entries one SKU actor may have proposed and not yet seen applied.
    /// More than one lets the next batch be appended while the previous one
    /// is being fsynced; entries still commit and apply in proposal order.
    pub proposals_in_flight_max: usize,
    /// An actor with nothing to do for this long stops; the next request
    /// starts a fresh one.
    pub idle_ms: u64,
    /// How long a request waits for its outcome before it is answered as
    /// timed out (its command may still apply: retry with the same key).
    pub request_timeout_ms: u64,
}

impl Default for ActorLimits {
    fn default() -> Self {
        ActorLimits {
            mailbox_max: 4_096,
            queue_max: 8_192,
            batch_max: 1_024,
            proposals_in_flight_max: 1,
            idle_ms: 30_000,
            request_timeout_ms: 5_000,
        }
    }
}

/// A command and where its outcome goes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ask {
    command: Command,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Which SKU actor proposes a command. Commands that touch no SKU (opening a
/// session) share one lane of their own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The actor of this SKU.
    Sku(String),
    /// The actor for commands without a SKU.
    Group,
}

/// Live actors by key, started on first use. Shared by the HTTP workers.
pub struct Registry<K, A: Actor> {
    actors: Arc<Mutex<Actors<K, A>>>,
}

/// The registry's map. An actor that passivated leaves its entry behind
/// until its key is used again, and sessions and SKU names keep coming, so
/// the entries of stopped actors are swept out whenever the map has doubled
/// since the last sweep.
struct Actors<K, A: Actor> {
    by_key: HashMap<K, Addr<A>>,
    sweep_at: usize,
}

/// The least size at which the registry sweeps out stopped actors.
const SWEEP_FROM: usize = 1_024;

impl<K, A: Actor> Default for Actors<K, A> {
    fn default() -> Self {
        Actors { by_key: HashMap::new(), sweep_at: SWEEP_FROM }
    }
}

impl<K, A: Actor> Clone for Registry<K, A> {
    fn clone(&self) -> Self {
        Registry { actors: self.actors.clone() }
    }
}

impl<K: Clone + Eq + Hash, A: Actor<Context = Context<A>> + Handler<Ask>> Registry<K, A> {
    fn new() -> Self {
        Registry { actors: Arc::default() }
    }

    /// Sends `command` to `key`'s actor, starting it if needed, and waits for
    /// the outcome. An actor that passivated between lookup and send is
    /// restarted and asked again: its mailbox was dropped unprocessed, so
    /// nothing was proposed.
    async fn ask(
        &self,
        key: &K,
        command: Command,
        limits: &ActorLimits,
        start: impl Fn() -> A,
    ) -> Result<Outcome, ProposeError> {
        for _ in 0..3 {
            let addr = self.get_or_start(key, limits, &start);
            let (reply, outcome) = oneshot::channel();
            match addr.try_send(Ask { command: command.clone(), reply }) {
                Ok(()) => {}
                Err(SendError::Full(_)) => return Err(ProposeError::Overloaded),
                Err(SendError::Closed(_)) => {
                    self.forget(key, &addr);
                    continue;
                }
            }
            match tokio::time::timeout(Duration::from_millis(limits.request_timeout_ms), outcome).await {
                Ok(Ok(result)) => return result,
                Ok(Err(_dropped)) => {
                    self.forget(key, &addr);
                    continue;
                }
                Err(_elapsed) => return Err(ProposeError::Timeout),
            }
        }
        Err(ProposeError::Unavailable("actor kept stopping".into()))
    }

    fn get_or_start(&self, key: &K, limits: &ActorLimits, start: impl Fn() -> A) -> Addr<A> {
        let mut actors = self.actors.lock().expect("registry lock poisoned");
        if let Some(addr) = actors.by_key.get(key).filter(|addr| addr.connected()) {
            return addr.clone();
        }
        if actors.by_key.len() >= actors.sweep_at {
            actors.by_key.retain(|_, addr| addr.connected());
            actors.sweep_at = SWEEP_FROM.max(2 * actors.by_key.len());
        }
        let mailbox_max = limits.mailbox_max;
        let addr = A::create(|ctx| {
            ctx.set_mailbox_capacity(mailbox_max);
            start()
        });
        actors.by_key.insert(key.clone(), addr.clone());
        addr
    }

    /// Drops `key`'s entry if it still names `addr` (a newer actor may have
    /// taken its place).
    fn forget(&self, key: &K, addr: &Addr<A>) {
        let mut actors = self.actors.lock().expect("registry lock poisoned");
        if actors.by_key.get(key) == Some(addr) {
            actors.by_key.remove(key);
        }
    }

    /// How many actors are live, for metrics.
    pub fn len(&self) -> usize {
        let actors = self.actors.lock().expect("registry lock poisoned");
        actors.by_key.values().filter(|addr| addr.connected()).count()
    }

    /// Whether no actor is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The SKU actor: proposes the commands of one lane in batches, with at most
/// `proposals_in_flight_max` proposals in flight.
pub struct SkuActor {
    group: Group,
    limits: ActorLimits,
    /// Commands waiting for the in-flight proposal to finish.
    queue: VecDeque<Ask>,
    /// Proposals sent and not yet answered.
    in_flight: usize,
    last_active: Instant,
}

impl SkuActor {
    fn new(group: Group, limits: ActorLimits) -> Self {
        SkuActor { group, limits, queue: VecDeque::new(), in_flight: 0, last_active: Instant::now() }
    }

    /// Proposes everything queued (up to `batch_max`) as one entry, unless
    /// as many proposals as allowed are in flight; each completion calls this
    /// again, so what queued meanwhile leaves as the next batch.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight >= self.limits.proposals_in_flight_max {
            return;
        }
        // A caller that gave up (timed out, or its shopper left) was told
        // the command may still apply; after an outage thousands may wait
        // here, and proposing them would hold stock for shoppers who left
        // and keep the fresh requests waiting behind them.
        self.queue.retain(|ask| !ask.reply.is_closed());
        if self.queue.is_empty() {
            return;
        }
        let size = self.queue.len().min(self.limits.batch_max);
        let (commands, replies): (Vec<_>, Vec<_>) =
            self.queue.drain(..size).map(|ask| (ask.command, ask.reply)).unzip();
        metrics::histogram!("surge_batch_size").record(size as f64);
        self.in_flight += 1;
        let group = self.group.clone();
        let timeout = Duration::from_millis(self.limits.request_timeout_ms);
        let proposal = async move {
            match tokio::time::timeout(timeout, group.propose(commands)).await {
                Ok(result) => result,
                Err(_elapsed) => Err(ProposeError::Timeout),
            }
        };
        ctx.spawn(proposal.into_actor(self).map(move |result, actor, ctx| {
            actor.in_flight -= 1;
            actor.last_active = Instant::now();
            match result {
                Ok(response) => {
                    assert_eq!(response.outcomes.len(), replies.len(), "one outcome per command");
                    for (reply, outcome) in replies.into_iter().zip(response.outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            actor.flush(ctx);
        }));
    }
}

impl Actor for SkuActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        passivate_when_idle(ctx, self.limits.idle_ms, |actor: &Self| {
            (actor.in_flight == 0 && actor.queue.is_empty()).then_some(actor.last_active)
        });
    }
}

impl Handler<Ask> for SkuActor {
    type Result = ();

    fn handle(&mut self, ask: Ask, ctx: &mut Context<Self>) {
        self.last_active = Instant::now();
        if self.queue.len() >= self.limits.queue_max {
            let _ = ask.reply.send(Err(ProposeError::Overloaded));
            return;
        }
        self.queue.push_back(ask);
        self.flush(ctx);
    }
}

/// The session actor: runs one shopper session's commands one at a time, in
/// the order they arrived, each through the SKU actor it touches.
pub struct SessionActor {
    session: SessionId,
    router: Router,
    last_active: Instant,
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // While a command is being awaited (`ctx.wait`) the interval does not
        // run, so an idle check here only ever sees an idle session.
        passivate_when_idle(ctx, self.router.limits.idle_ms, |actor: &Self| Some(actor.last_active));
    }
}

impl Handler<Ask> for SessionActor {
    type Result = ();

    fn handle(&mut self, ask: Ask, ctx: &mut Context<Self>) {
        if ask.reply.is_closed() {
            return; // its caller gave up while it waited its turn
        }
        let router = self.router.clone();
        let lane = router.lane_of(self.session, &ask.command);
        // `wait` holds the mailbox until this command has its outcome, which
        // is what orders a shopper's own commands.
        ctx.wait(
            async move {
                let outcome = router.proposers.ask(&lane, ask.command, &router.limits, || router.sku_actor()).await;
                let _ = ask.reply.send(outcome);
            }
            .into_actor(self)
            .map(|(), actor, _| actor.last_active = Instant::now()),
        );
    }
}

/// Stops the actor once `idle_since` has reported the same instant for
/// `idle_ms`. `idle_since` answers `None` while the actor is busy.
fn passivate_when_idle<A>(ctx: &mut Context<A>, idle_ms: u64, idle_since: impl Fn(&A) -> Option<Instant> + 'static)
where
    A: Actor<Context = Context<A>>,
{
    let idle = Duration::from_millis(idle_ms);
    ctx.run_interval(idle / 2, move |actor, ctx| {
        if idle_since(actor).is_some_and(|since| since.elapsed() >= idle) {
            ctx.stop();
        }
    });
}

/// Finds or starts the actor for a command and hands it over.
#[derive(Clone)]
pub struct Router {
    group: Group,
    limits: ActorLimits,
    proposers: Registry<Lane, SkuActor>,
    sessions: Registry<SessionId, SessionActor>,
}

impl Router {
    /// A router for `group` with no live actors yet.
    pub fn new(group: Group, limits: ActorLimits) -> Self {
        Router { group, limits, proposers: Registry::new(), sessions: Registry::new() }
    }

    /// Proposes a command that belongs to no session (operator commands,
    /// opening a session) through its lane's SKU actor.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let lane = match command.routing_sku() {
            Some(sku) => Lane::Sku(sku.to_string()),
            None => Lane::Group,
        };
        self.proposers.ask(&lane, command, &self.limits, || self.sku_actor()).await
    }

    /// Runs a shopper's command through their session actor.
    pub async fn session(&self, session: SessionId, command: Command) -> Result<Outcome, ProposeError> {
        self.sessions
            .ask(&session, command, &self.limits, || SessionActor {
                session,
                router: self.clone(),
                last_active: Instant::now(),
            })
            .await
    }

    /// How many SKU and session actors are live.
    pub fn live_actors(&self) -> (usize, usize) {
        (self.proposers.len(), self.sessions.len())
    }

    fn sku_actor(&self) -> SkuActor {
        SkuActor::new(self.group.clone(), self.limits.clone())
    }

    /// The lane of a shopper command: the first SKU it touches, looked up in
    /// the local state for commands that name only an order or the cart. A
    /// stale lookup only changes which batch the command joins, never what
    /// it does.
    fn lane_of(&self, session: SessionId, command: &Command) -> Lane {
        let sku = match command {
            Command::SetCartItem { sku, .. } | Command::RemoveCartItem { sku, .. } => Some(sku.clone()),
            Command::Checkout { items: None, .. } => {
                self.group.read_local(|state| state.cart(session).ok()?.lines.first().map(|line| line.sku.clone()))
            }
            Command::Pay { order, .. } | Command::Cancel { order, .. } => self
                .group
                .read_local(|state| state.order(session, *order).ok()?.lines.first().map(|line| line.sku.clone())),
            other => other.routing_sku().map(str::to_string),
        };
        sku.map_or(Lane::Group, Lane::Sku)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor that passivates as soon as it starts.
    struct Passing;

    impl Actor for Passing {
        type Context = Context<Self>;

        fn started(&mut self, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    impl Handler<Ask> for Passing {
        type Result = ();

        fn handle(&mut self, _: Ask, _: &mut Context<Self>) {}
    }

    /// Every session and every SKU name a shopper sends starts an actor:
    /// the registry must not keep one entry per key it ever saw.
    #[actix_rt::test]
    async fn the_registry_forgets_actors_that_passivated() {
        let registry = Registry::<u64, Passing>::new();
        let limits = ActorLimits::default();
        for key in 0..20 * SWEEP_FROM as u64 {
            registry.get_or_start(&key, &limits, || Passing);
            if key % 256 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await; // let them stop
            }
        }
        let kept = registry.actors.lock().unwrap().by_key.len();
        assert!(kept <= 2 * SWEEP_FROM, "{kept} entries kept for {} keys seen", 20 * SWEEP_FROM);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(registry.len(), 0, "no actor is live");
    }
}
