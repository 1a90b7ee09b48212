//! The pipeline: builder, handle and the async runtime that drives the [`Engine`].
//!
//! One task owns the engine. It takes, in this order of priority: shutdown, completions of
//! fetches/writes/dead letters/commits (so memory is released before new records are taken),
//! control requests from [`PipelineHandle`]s, consumer events (records, rebalances), and timers
//! (debounce deadlines, retries, the commit interval). Nothing else touches the engine's state,
//! so it needs no locks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::assignment::{Assignment, TopicPartition};
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::consumer::{ConsumerChannels, ConsumerCommand, ConsumerEvent, Offsets};
use crate::decode::NotificationDecoder;
use crate::dispatch::{
    Completion, DeadLetterResult, DeadLetterWriter, FetchDispatcher, dispatch_dead_letter,
    start_sink_writer,
};
use crate::engine::{Action, Decoders, Engine, EngineStatus, RefreshOutcome};
use crate::fetch::{Fetcher, OwnershipShare};
#[cfg(feature = "kafka")]
use crate::kafka::{DeadLetterProducer, KafkaConfig, KafkaSetupError, start_consumer};
use crate::key::EntityKey;
use crate::sink::Sink;

/// Building or running a pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A required part is missing.
    #[error("pipeline is missing {0}")]
    Missing(&'static str),
    /// An engine setting is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Kafka could not be set up.
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    /// The consumer failed for good.
    #[error("consumer failed: {0}")]
    Consumer(String),
}

/// Where records come from.
enum Source {
    #[cfg(feature = "kafka")]
    Kafka(KafkaConfig),
    Channels(ConsumerChannels),
}

/// Builds a [`Pipeline`].
pub struct PipelineBuilder<F, S> {
    fetcher: Option<Arc<F>>,
    sink: Option<Arc<S>>,
    source: Option<Source>,
    decoders: Decoders,
    engine: EngineConfig,
    dead_letters: Option<Arc<dyn DeadLetterWriter>>,
}

/// A running notification-plus-pull pipeline. See the crate docs for an example.
pub struct Pipeline<F, S> {
    fetcher: Arc<F>,
    sink: Arc<S>,
    source: Source,
    decoders: Decoders,
    engine: EngineConfig,
    dead_letters: Option<Arc<dyn DeadLetterWriter>>,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: mpsc::UnboundedReceiver<Control>,
}

impl Pipeline<(), ()> {
    /// Start building a pipeline.
    pub fn builder<F: Fetcher, S: Sink>() -> PipelineBuilder<F, S> {
        PipelineBuilder {
            fetcher: None,
            sink: None,
            source: None,
            decoders: Decoders::new(),
            engine: EngineConfig::default(),
            dead_letters: None,
        }
    }
}

impl<F: Fetcher, S: Sink> PipelineBuilder<F, S> {
    /// The fetcher.
    pub fn fetcher(mut self, fetcher: impl Into<Arc<F>>) -> Self {
        self.fetcher = Some(fetcher.into());
        self
    }

    /// The sink.
    pub fn sink(mut self, sink: impl Into<Arc<S>>) -> Self {
        self.sink = Some(sink.into());
        self
    }

    /// Consume from Kafka.
    #[cfg(feature = "kafka")]
    pub fn kafka(mut self, cfg: KafkaConfig) -> Self {
        self.source = Some(Source::Kafka(cfg));
        self
    }

    /// Consume from a consumer driver (for example [`crate::consumer::MemoryConsumer`]).
    pub fn consumer(mut self, channels: ConsumerChannels) -> Self {
        self.source = Some(Source::Channels(channels));
        self
    }

    /// The decoder for topics without their own.
    pub fn decoder(mut self, decoder: impl NotificationDecoder) -> Self {
        self.decoders = self.decoders.default_decoder(Arc::new(decoder));
        self
    }

    /// The decoder for one topic.
    pub fn topic_decoder(
        mut self,
        topic: impl Into<String>,
        decoder: impl NotificationDecoder,
    ) -> Self {
        self.decoders = self.decoders.topic(topic, Arc::new(decoder));
        self
    }

    /// Engine settings.
    pub fn engine(mut self, cfg: EngineConfig) -> Self {
        self.engine = cfg;
        self
    }

    /// Where dead letters go, when not to the Kafka dead-letter topic (required with a custom
    /// consumer driver).
    pub fn dead_letters(mut self, writer: impl DeadLetterWriter) -> Self {
        self.dead_letters = Some(Arc::new(writer));
        self
    }

    /// Check the parts and settings.
    pub fn build(self) -> Result<Pipeline<F, S>, PipelineError> {
        let fetcher = self.fetcher.ok_or(PipelineError::Missing("a fetcher"))?;
        let sink = self.sink.ok_or(PipelineError::Missing("a sink"))?;
        let source = self
            .source
            .ok_or(PipelineError::Missing("a source (kafka or consumer)"))?;
        let max_poll = match &source {
            #[cfg(feature = "kafka")]
            Source::Kafka(k) => {
                k.validate()?;
                Some(k.max_poll_interval())
            }
            Source::Channels(_) => {
                if self.dead_letters.is_none() {
                    return Err(PipelineError::Missing(
                        "a dead-letter writer (required without Kafka)",
                    ));
                }
                None
            }
        };
        self.engine.validate(max_poll)?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        Ok(Pipeline {
            fetcher,
            sink,
            source,
            decoders: self.decoders,
            engine: self.engine,
            dead_letters: self.dead_letters,
            control_tx,
            control_rx,
        })
    }
}

enum Control {
    Status(oneshot::Sender<Status>),
    Refresh(
        Vec<EntityKey>,
        oneshot::Sender<Vec<(EntityKey, RefreshOutcome)>>,
    ),
    ResetGoneGuard(Option<String>),
    Reconfigure(Box<EngineConfig>),
    Shutdown,
}

/// The state of a running pipeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The engine's figures.
    pub engine: EngineStatus,
    /// The consumer joined the group (received an assignment, possibly empty).
    pub joined: bool,
    /// The Kafka brokers answer (as far as the consumer client can tell).
    pub broker_reachable: bool,
    /// The pipeline is shutting down.
    pub shutting_down: bool,
    /// Why the pipeline is not ready, if it is not.
    pub not_ready: Vec<String>,
}

impl Status {
    /// Ready to be sent traffic: joined, no guard tripped, dead letters writable.
    pub fn ready(&self) -> bool {
        self.not_ready.is_empty()
    }
}

/// A cheap handle to a running pipeline: status, on-demand refreshes, operator actions.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    tx: mpsc::UnboundedSender<Control>,
}

impl PipelineHandle {
    /// The current status, or `None` when the pipeline stopped.
    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Control::Status(tx)).ok()?;
        rx.await.ok()
    }

    /// Refresh these keys now through the engine's single flight; resolves when each is written
    /// (or failed).
    pub async fn refresh(&self, keys: Vec<EntityKey>) -> Vec<(EntityKey, RefreshOutcome)> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Control::Refresh(keys.clone(), tx)).is_err() {
            return keys
                .into_iter()
                .map(|k| (k, RefreshOutcome::Failed("pipeline stopped".into())))
                .collect();
        }
        rx.await.unwrap_or_default()
    }

    /// Allow deletes again after the gone guard tripped, for every source: the deletes it held
    /// are released (fetched again now and, still gone, written).
    pub fn reset_gone_guard(&self) {
        let _ = self.tx.send(Control::ResetGoneGuard(None));
    }

    /// Reset the gone guard of one source (see [`PipelineHandle::reset_gone_guard`]).
    pub fn reset_gone_guard_of(&self, source: impl Into<String>) {
        let _ = self.tx.send(Control::ResetGoneGuard(Some(source.into())));
    }

    /// Apply the settings of `cfg` that can change while the pipeline runs: the debounce window
    /// and max-wait (for notifications received from then on), fetch concurrency, the caps and
    /// resume ratio, and sink batching (`sink_batch_max`, `sink_linger`). Other settings need a
    /// new pipeline. Returns `false` when the pipeline stopped. The settings are validated first
    /// (against nothing but themselves: the consumer's poll interval is not re-checked).
    pub fn reconfigure(&self, cfg: EngineConfig) -> Result<bool, crate::config::ConfigError> {
        cfg.validate(None)?;
        Ok(self.tx.send(Control::Reconfigure(Box::new(cfg))).is_ok())
    }

    /// Ask the pipeline to shut down gracefully.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Control::Shutdown);
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// The engine's final figures.
    pub status: EngineStatus,
    /// Shutdown finished every pending key within the deadline.
    pub drained: bool,
}

struct PendingRevoke {
    assignments: Vec<Assignment>,
    reply: std::sync::mpsc::SyncSender<Offsets>,
    /// The handler's deadline, less a margin for the answer to reach it.
    deadline: tokio::time::Instant,
}

struct RefreshRequest {
    reply: Option<oneshot::Sender<Vec<(EntityKey, RefreshOutcome)>>>,
    remaining: usize,
    results: Vec<(EntityKey, RefreshOutcome)>,
}

impl<F: Fetcher, S: Sink> Pipeline<F, S> {
    /// A handle to this pipeline (usable before and while it runs).
    pub fn handle(&self) -> PipelineHandle {
        PipelineHandle {
            tx: self.control_tx.clone(),
        }
    }

    /// Run until `shutdown` resolves (or a handle asks to stop), then shut down gracefully: stop
    /// taking records, flush pending keys without waiting out the debounce, finish in-flight work
    /// within the deadline, commit synchronously and close the consumer.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunReport, PipelineError> {
        let Pipeline {
            fetcher,
            sink,
            source,
            decoders,
            engine: cfg,
            dead_letters,
            control_tx: _control_tx,
            mut control_rx,
        } = self;
        let (channels, dead_letters): (ConsumerChannels, Arc<dyn DeadLetterWriter>) = match source {
            #[cfg(feature = "kafka")]
            Source::Kafka(k) => {
                let writer: Arc<dyn DeadLetterWriter> = match dead_letters {
                    Some(w) => w,
                    None => {
                        let p = DeadLetterProducer::new(&k)?;
                        // The brokers first: when they cannot be reached, say so, not that the
                        // dead-letter topic is unusable.
                        p.probe_brokers(Duration::from_secs(10)).await?;
                        p.check(Duration::from_secs(10)).await?;
                        Arc::new(p)
                    }
                };
                (
                    start_consumer(&k, cfg.rebalance_drain, cfg.commit_timeout)?,
                    writer,
                )
            }
            Source::Channels(c) => (
                c,
                dead_letters.ok_or(PipelineError::Missing("a dead-letter writer"))?,
            ),
        };
        let ConsumerChannels {
            mut events,
            commands,
            queued,
        } = channels;

        let handles_fetcher = fetcher.clone();
        let sources_fetcher = fetcher.clone();
        let mut engine = Engine::new(
            cfg.clone(),
            decoders,
            Box::new(move |t: &str| handles_fetcher.handles(t)),
            sink.tracks_versions(),
        )
        .with_sources(Box::new(move |t: &str| sources_fetcher.source_name(t)));
        let clock = Clock::start();
        // Cancelled when `run` returns: no fetch, write or dead-letter task outlives the run.
        let stop = CancellationToken::new();
        let _stop_on_return = stop.clone().drop_guard();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Completion>();
        let fetches = FetchDispatcher {
            fetcher: fetcher.clone(),
            sink: sink.clone(),
            done: done_tx.clone(),
            stop: stop.clone(),
        };
        let writes = start_sink_writer(sink.clone(), &cfg, done_tx.clone(), stop.clone());

        let mut rt = Runtime {
            revokes: Vec::new(),
            outages: std::collections::BTreeSet::new(),
            joined: false,
            broker: (true, String::new()),
            commit_in_flight: false,
        };
        let mut refreshes: HashMap<u64, (usize, usize)> = HashMap::new();
        let mut refresh_requests: HashMap<usize, RefreshRequest> = HashMap::new();
        let mut next_waiter = 1u64;
        let mut next_request = 1usize;
        let mut commit_tick = tokio::time::interval(cfg.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown_deadline: Option<tokio::time::Instant> = None;
        let mut consumer_open = true;
        tokio::pin!(shutdown);
        let mut shutdown_fired = false;

        loop {
            let wake = engine
                .next_wakeup()
                .map(|t| clock.instant(t))
                .into_iter()
                .chain(rt.revokes.iter().map(|r| r.deadline))
                .chain(shutdown_deadline)
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let taking_records = shutdown_deadline.is_none();
            tokio::select! {
                biased;
                () = &mut shutdown, if !shutdown_fired => {
                    shutdown_fired = true;
                    begin_shutdown(&mut engine, &clock, &cfg, &mut shutdown_deadline);
                }
                Some(c) = done_rx.recv() => {
                    apply_completion(&mut engine, c, &clock, &mut rt.commit_in_flight);
                    // Drain whatever else completed, cheaply.
                    while let Ok(c) = done_rx.try_recv() {
                        apply_completion(&mut engine, c, &clock, &mut rt.commit_in_flight);
                    }
                }
                Some(ctl) = control_rx.recv() => match ctl {
                    Control::Status(reply) => {
                        let _ = reply.send(status_of(&engine, &clock, &rt, shutdown_deadline.is_some()));
                    }
                    Control::Refresh(keys, reply) => {
                        let id = next_request;
                        next_request += 1;
                        let n = keys.len();
                        refresh_requests.insert(id, RefreshRequest { reply: Some(reply), remaining: n, results: Vec::new() });
                        for (index, key) in keys.into_iter().enumerate() {
                            let w = next_waiter;
                            next_waiter += 1;
                            refreshes.insert(w, (id, index));
                            if let Some(r) = refresh_requests.get_mut(&id) {
                                r.results.push((key.clone(), RefreshOutcome::Failed("not finished".into())));
                            }
                            engine.refresh(key, w, clock.now());
                        }
                        if n == 0 {
                            finish_refresh(&mut refresh_requests, id);
                        }
                    }
                    Control::ResetGoneGuard(source) => {
                        tracing::info!(source = source.as_deref().unwrap_or("(all)"), "gone guard reset by operator");
                        engine.reset_gone_guard(source.as_deref());
                    }
                    Control::Reconfigure(new) => {
                        tracing::info!("engine settings changed live");
                        engine.reconfigure(&new);
                        writes.reconfigure(&new);
                        if new.commit_interval != commit_tick.period() {
                            commit_tick = tokio::time::interval(new.commit_interval);
                            commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    Control::Shutdown => {
                        if shutdown_deadline.is_none() {
                            begin_shutdown(&mut engine, &clock, &cfg, &mut shutdown_deadline);
                        }
                    }
                },
                ev = events.recv(), if consumer_open => match ev {
                    None => {
                        consumer_open = false;
                        if shutdown_deadline.is_none() {
                            tracing::error!("consumer stopped unexpectedly; shutting down");
                            begin_shutdown(&mut engine, &clock, &cfg, &mut shutdown_deadline);
                        }
                    }
                    Some(ConsumerEvent::Records(records)) => {
                        queued.sub(&records);
                        engine.set_queued_bytes(queued.get());
                        if taking_records {
                            engine.on_records(records.iter().map(|r| r.view()), clock.now());
                        }
                    }
                    Some(ev) => rt.on_event(ev, &mut engine, &commands, &*fetcher),
                },
                _ = commit_tick.tick(), if !rt.commit_in_flight => {
                    let offsets = engine.commits();
                    if !offsets.is_empty() {
                        rt.commit_in_flight = true;
                        spawn_commit(&commands, offsets, done_tx.clone(), cfg.commit_timeout);
                    }
                    let st = engine.status(clock.now());
                    rt.publish_health(&st);
                    crate::metrics::gauges(
                        st.pending_keys,
                        st.oldest_pending_ms.map(Duration::from_millis),
                        st.partitions.iter().filter(|p| p.paused).count(),
                    );
                    for p in &st.partitions {
                        if let Some(o) = p.last_received {
                            crate::metrics::consumed(&TopicPartition::new(p.topic.as_str(), p.partition), o + 1);
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }

            // Revokes whose writes drained (or whose deadline passed) answer now.
            rt.answer_revokes(&mut engine, false, &*fetcher);

            let now = clock.now();
            engine.poll(now);
            for action in engine.take_actions_grouped() {
                match action {
                    Grouped::Fetches(jobs) => fetches.dispatch(jobs),
                    Grouped::Other(Action::Write(job)) => writes.send(job),
                    Grouped::Other(Action::DeadLetter(job)) => {
                        dispatch_dead_letter(
                            dead_letters.clone(),
                            job,
                            done_tx.clone(),
                            stop.clone(),
                        );
                    }
                    Grouped::Other(Action::Fetch(job)) => fetches.dispatch(vec![job]),
                }
            }
            let changes = engine.pause_changes();
            if !changes.pause.is_empty() {
                let mem = engine.memory();
                tracing::info!(
                    partitions = changes.pause.len(),
                    pending_keys = mem.keys,
                    pending_bytes = mem.total_bytes(),
                    "pausing partitions (backpressure)"
                );
                let _ = commands.send(ConsumerCommand::Pause(changes.pause));
            }
            if !changes.resume.is_empty() {
                tracing::info!(partitions = changes.resume.len(), "resuming partitions");
                let _ = commands.send(ConsumerCommand::Resume(changes.resume));
            }
            for (waiter, outcome) in engine.take_refresh_outcomes() {
                if let Some((req, index)) = refreshes.remove(&waiter) {
                    if let Some(r) = refresh_requests.get_mut(&req) {
                        if let Some(slot) = r.results.get_mut(index) {
                            slot.1 = outcome;
                        }
                        r.remaining = r.remaining.saturating_sub(1);
                        if r.remaining == 0 {
                            finish_refresh(&mut refresh_requests, req);
                        }
                    }
                }
            }

            if let Some(deadline) = shutdown_deadline {
                let done = engine.is_idle() || tokio::time::Instant::now() >= deadline;
                if done {
                    break;
                }
            }
        }

        // Final synchronous commit, then close the consumer.
        let drained = engine.is_idle();
        if !drained {
            tracing::warn!(
                pending_keys = engine.pending_keys(),
                "shutdown deadline passed; unfinished work is not committed"
            );
        }
        // Answer revokes still waiting so the consumer thread is not blocked.
        rt.answer_revokes(&mut engine, true, &*fetcher);
        let offsets = engine.commits();
        if offsets.is_empty() {
            tracing::info!(
                "final commit: nothing left to commit (every consumed offset is committed)"
            );
        } else {
            let (tx, rx) = oneshot::channel();
            if commands
                .send(ConsumerCommand::Commit {
                    offsets: offsets.clone(),
                    reply: tx,
                })
                .is_ok()
            {
                let until = tokio::time::Instant::now() + cfg.commit_timeout;
                tokio::pin!(rx);
                // A revoke arriving meanwhile is answered at once: the consumer's handler must
                // not wait for an engine that stopped taking work.
                let result = loop {
                    tokio::select! {
                        r = &mut rx => break Some(r),
                        () = tokio::time::sleep_until(until) => break None,
                        ev = events.recv(), if consumer_open => match ev {
                            None => consumer_open = false,
                            Some(ConsumerEvent::Records(records)) => queued.sub(&records),
                            Some(ev) => {
                                rt.on_event(ev, &mut engine, &commands, &*fetcher);
                                rt.answer_revokes(&mut engine, true, &*fetcher);
                            }
                        },
                    }
                };
                match result {
                    Some(Ok(Ok(committed))) => {
                        for (a, o) in &committed {
                            engine.committed(a, *o);
                        }
                        tracing::info!(partitions = committed.len(), "final commit done");
                    }
                    Some(Ok(Err(e))) => tracing::warn!(error = %e, "final commit failed"),
                    _ => tracing::warn!("final commit did not complete"),
                }
            }
        }
        // No task of this run may write after it returns.
        stop.cancel();
        let (tx, rx) = oneshot::channel();
        if commands.send(ConsumerCommand::Close { reply: tx }).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
        }
        Ok(RunReport {
            status: engine.status(clock.now()),
            drained,
        })
    }
}

/// The runtime's view of the consumer: revokes waiting to be answered, group membership and
/// broker reachability.
struct Runtime {
    revokes: Vec<PendingRevoke>,
    /// Sources whose outage gauge is set.
    outages: std::collections::BTreeSet<String>,
    joined: bool,
    /// Reachable, and what the client said last.
    broker: (bool, String),
    commit_in_flight: bool,
}

impl Runtime {
    /// Per-source outage and gone-guard gauges, and the blocked keys, from a status snapshot.
    fn publish_health(&mut self, st: &EngineStatus) {
        let now: std::collections::BTreeSet<String> =
            st.outages.iter().map(|o| o.source.clone()).collect();
        for gone in self.outages.difference(&now) {
            crate::metrics::source_outage(gone, false);
        }
        for s in &now {
            crate::metrics::source_outage(s, true);
        }
        self.outages = now;
        crate::metrics::gone_guard(st.gone_guard_tripped, st.gone_ratio);
        crate::metrics::keys_blocked(st.blocked_keys);
    }

    fn on_event<F: Fetcher + ?Sized>(
        &mut self,
        ev: ConsumerEvent,
        engine: &mut Engine,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        fetcher: &F,
    ) {
        match ev {
            ConsumerEvent::Records(_) => {}
            ConsumerEvent::Assigned(assignments) => {
                self.joined = true;
                tracing::info!(partitions = assignments.len(), "partitions assigned");
                engine.assign(&assignments);
                // The engine owns the desired pause state: re-apply it after every assignment.
                let paused: Vec<TopicPartition> = engine.paused();
                if !paused.is_empty() {
                    let _ = commands.send(ConsumerCommand::Pause(paused));
                }
                ownership_changed(engine, fetcher);
            }
            ConsumerEvent::Revoke {
                assignments,
                reply,
                deadline,
            } => {
                tracing::info!(
                    partitions = assignments.len(),
                    "partitions revoked: draining"
                );
                engine.revoke_begin(&assignments);
                // Answer a little before the handler gives up, so the answer reaches it.
                let margin = Duration::from_millis(100);
                let deadline = deadline
                    .checked_sub(margin)
                    .unwrap_or(deadline)
                    .max(tokio::time::Instant::now());
                self.revokes.push(PendingRevoke {
                    assignments,
                    reply,
                    deadline,
                });
            }
            ConsumerEvent::Lost(assignments) => {
                tracing::warn!(partitions = assignments.len(), "partitions lost");
                engine.lose(&assignments);
                ownership_changed(engine, fetcher);
            }
            ConsumerEvent::Positions(positions) => engine.observe_positions(&positions),
            ConsumerEvent::Broker { reachable, reason } => self.broker = (reachable, reason),
            ConsumerEvent::Error { message, fatal } => {
                if fatal {
                    tracing::error!(error = %message, "fatal consumer error");
                }
            }
        }
    }

    /// Answer revokes whose writes drained or whose deadline passed (all of them with `all`).
    fn answer_revokes<F: Fetcher + ?Sized>(&mut self, engine: &mut Engine, all: bool, fetcher: &F) {
        if self.revokes.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut i = 0;
        let mut answered = false;
        while i < self.revokes.len() {
            let r = &self.revokes[i];
            if all || engine.revoke_drained(&r.assignments) || now >= r.deadline {
                let r = self.revokes.swap_remove(i);
                let offsets = engine.revoke_finish(&r.assignments);
                tracing::info!(
                    partitions = r.assignments.len(),
                    commits = offsets.len(),
                    "revoke drained"
                );
                let _ = r.reply.send(offsets);
                answered = true;
            } else {
                i += 1;
            }
        }
        if answered {
            ownership_changed(engine, fetcher);
        }
    }
}

/// Tell the fetcher which share of the group's partitions this instance owns.
fn ownership_changed<F: Fetcher + ?Sized>(engine: &Engine, fetcher: &F) {
    fetcher.ownership_changed(OwnershipShare {
        owned: engine.owned_partitions().len(),
        total: 0,
    });
}

fn finish_refresh(reqs: &mut HashMap<usize, RefreshRequest>, id: usize) {
    if let Some(mut r) = reqs.remove(&id) {
        if let Some(reply) = r.reply.take() {
            let _ = reply.send(r.results);
        }
    }
}

fn begin_shutdown(
    engine: &mut Engine,
    clock: &Clock,
    cfg: &EngineConfig,
    deadline: &mut Option<tokio::time::Instant>,
) {
    tracing::info!(
        pending_keys = engine.pending_keys(),
        "shutting down: flushing pending keys"
    );
    engine.flush(clock.now());
    *deadline = Some(tokio::time::Instant::now() + cfg.shutdown_deadline);
}

fn status_of(engine: &Engine, clock: &Clock, rt: &Runtime, shutting_down: bool) -> Status {
    let engine_status = engine.status(clock.now());
    let mut not_ready = Vec::new();
    if !rt.broker.0 {
        not_ready.push(format!("kafka brokers unreachable ({})", rt.broker.1));
    }
    if !rt.joined {
        not_ready.push("not yet joined the consumer group".to_owned());
    }
    for o in &engine_status.outages {
        not_ready.push(format!(
            "source {} in outage: {:.0}% of its {} recent fetches failed ({}); its keys are held, \
             none is dead-lettered",
            o.source,
            o.share * 100.0,
            o.outcomes,
            o.cause
        ));
    }
    for g in engine_status.gone_guards.iter().filter(|g| g.tripped) {
        not_ready.push(format!(
            "gone guard of source {} tripped ({:.0}% of its {} recent fetches said gone): \
             deletes are held until the share drops or an operator resets the guard",
            g.source,
            g.ratio * 100.0,
            g.samples
        ));
    }
    if engine_status.dead_letter_broken {
        not_ready.push("dead-letter topic refuses writes".to_owned());
    }
    if shutting_down {
        not_ready.push("shutting down".to_owned());
    }
    crate::metrics::broker_reachable(rt.broker.0);
    Status {
        engine: engine_status,
        joined: rt.joined,
        broker_reachable: rt.broker.0,
        shutting_down,
        not_ready,
    }
}

fn apply_completion(
    engine: &mut Engine,
    c: Completion,
    clock: &Clock,
    commit_in_flight: &mut bool,
) {
    let now = clock.now();
    match c {
        Completion::Fetched {
            key,
            flight,
            result,
        } => engine.on_fetch_done(&key, flight, result, now),
        Completion::Written(results) => {
            for (key, flight, r) in results {
                engine.on_write_done(&key, flight, r, now);
            }
        }
        Completion::DeadLettered { id, result } => match result {
            DeadLetterResult::Acked => engine.on_dead_letter_done(id, Ok(())),
            DeadLetterResult::Broken(e) => engine.on_dead_letter_done(id, Err(e)),
            DeadLetterResult::Abandoned => engine.on_dead_letter_abandoned(id),
        },
        Completion::Committed { sent, result } => {
            *commit_in_flight = false;
            match result {
                Ok(committed) => {
                    if committed.len() < sent.len() {
                        tracing::debug!(
                            dropped = sent.len() - committed.len(),
                            "commit of assignments no longer current dropped by the consumer"
                        );
                    }
                    for (a, o) in committed {
                        engine.committed(&a, o);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "commit failed; retrying at the next interval");
                    engine.commit_failed();
                }
            }
        }
    }
}

fn spawn_commit(
    commands: &mpsc::UnboundedSender<ConsumerCommand>,
    offsets: Offsets,
    done: mpsc::UnboundedSender<Completion>,
    timeout: Duration,
) {
    let (tx, rx) = oneshot::channel();
    if commands
        .send(ConsumerCommand::Commit {
            offsets: offsets.clone(),
            reply: tx,
        })
        .is_err()
    {
        let _ = done.send(Completion::Committed {
            sent: offsets,
            result: Err("consumer closed".into()),
        });
        return;
    }
    tokio::spawn(async move {
        let result = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("consumer closed".into()),
            Err(_) => Err(format!("commit did not complete within {timeout:?}")),
        };
        let _ = done.send(Completion::Committed {
            sent: offsets,
            result,
        });
    });
}

/// Actions with fetches gathered so keys of one type can share a batched request.
pub(crate) enum Grouped {
    Fetches(Vec<crate::engine::FetchJob>),
    Other(Action),
}

impl Engine {
    pub(crate) fn take_actions_grouped(&mut self) -> Vec<Grouped> {
        let mut fetches = Vec::new();
        let mut out = Vec::new();
        for a in self.take_actions() {
            match a {
                Action::Fetch(j) => fetches.push(j),
                other => out.push(Grouped::Other(other)),
            }
        }
        if !fetches.is_empty() {
            out.insert(0, Grouped::Fetches(fetches));
        }
        out
    }
}
