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
use crate::consumer::{
    CommitMetadata, ConsumerChannels, ConsumerCommand, ConsumerEvent, GroupMetadataSource, Offsets,
    OwnedRecord,
};
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
use crate::sink::{OffsetStore, Sink};
use crate::txn_writer::{TxnGo, TxnWriter, start_txn_writer};

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
    /// The transactional sink failed for good (for example a Kafka producer fenced by another
    /// instance with the same `transactional.id`): nothing more was committed.
    #[error("the exactly-once sink cannot go on: {0}")]
    Transaction(String),
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
    group_id: Option<String>,
}

/// A running notification-plus-pull pipeline. See the crate docs for an example.
pub struct Pipeline<F, S> {
    fetcher: Arc<F>,
    sink: Arc<S>,
    source: Source,
    decoders: Decoders,
    engine: EngineConfig,
    dead_letters: Option<Arc<dyn DeadLetterWriter>>,
    group_id: String,
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
            group_id: None,
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

    /// The consumer group's name, when the source is not [`PipelineBuilder::kafka`] (which
    /// names it): an exactly-once sink stores offsets under it. Default `refetch`.
    pub fn group_id(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = Some(group_id.into());
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
        check_transactions(&*sink, &self.engine)?;
        let group_id = match (&source, self.group_id) {
            (_, Some(g)) => g,
            #[cfg(feature = "kafka")]
            (Source::Kafka(k), None) => k.group_id.clone(),
            _ => "refetch".to_owned(),
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        Ok(Pipeline {
            fetcher,
            sink,
            source,
            decoders: self.decoders,
            engine: self.engine,
            dead_letters: self.dead_letters,
            group_id,
            control_tx,
            control_rx,
        })
    }
}

/// A transactional sink's transaction must commit well within its timeout: the commit interval
/// plus a commit's own time must fit.
fn check_transactions<S: Sink + ?Sized>(
    sink: &S,
    cfg: &EngineConfig,
) -> Result<(), crate::config::ConfigError> {
    if sink.offset_store().is_none() {
        return Ok(());
    }
    if let Some(timeout) = sink.transaction_timeout() {
        let needed = cfg.commit_interval + cfg.commit_timeout;
        if needed >= timeout {
            return Err(crate::config::ConfigError {
                key: "commit_interval",
                reason: format!(
                    "commit_interval ({:?}) + commit_timeout ({:?}) must stay below the sink's \
                     transaction timeout ({timeout:?}): a transaction is open from its first \
                     write to the next commit",
                    cfg.commit_interval, cfg.commit_timeout
                ),
            });
        }
    }
    Ok(())
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
    /// Exactly-once: the transaction that was open when the writes drained; the revoke is
    /// answered once it ended (committed or aborted).
    wait_txn: Option<u64>,
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
            group_id,
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
        engine.set_wall_origin(clock.wall_origin_ms());
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
        let store = sink.offset_store();
        engine.set_wants_inputs(sink.wants_inputs());
        let writes = match store {
            Some(store) => {
                tracing::info!(
                    ?store,
                    "exactly-once delivery: writes are held in transactions with the input offsets"
                );
                engine.enable_transactions(store, sink.max_stored_ranges());
                Writer::Txn(start_txn_writer(
                    sink.clone(),
                    &cfg,
                    group_id.clone(),
                    done_tx.clone(),
                    stop.clone(),
                ))
            }
            None => Writer::Plain(start_sink_writer(
                sink.clone(),
                &cfg,
                done_tx.clone(),
                stop.clone(),
            )),
        };

        let mut rt = Runtime {
            revokes: Vec::new(),
            outages: std::collections::BTreeSet::new(),
            joined: false,
            broker: (true, String::new()),
            commit_in_flight: false,
            total_partitions: 0,
            group_metadata: None,
            txn_commit_in_flight: false,
            awaiting: HashMap::new(),
            held_bytes: 0,
            fatal: None,
            store,
            txn_timeout: sink.transaction_timeout(),
            stored: stored_lookup(
                sink.clone(),
                group_id.clone(),
                done_tx.clone(),
                stop.clone(),
            ),
            finalizing: false,
        };
        let mut refreshes: HashMap<u64, (usize, usize)> = HashMap::new();
        let mut refresh_requests: HashMap<usize, RefreshRequest> = HashMap::new();
        let mut next_waiter = 1u64;
        let mut next_request = 1usize;
        let mut commit_tick = tokio::time::interval(cfg.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // At-least-once: when a commit follows the writes that completed (see
        // `EngineConfig::commit_linger`), instead of the next tick.
        let mut commit_linger = cfg.commit_linger;
        let mut prompt_commit: Option<tokio::time::Instant> = None;
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
                    rt.apply(&mut engine, c, &clock, &writes, &commands, &done_tx, cfg.commit_timeout);
                    // Drain whatever else completed, cheaply.
                    while let Ok(c) = done_rx.try_recv() {
                        rt.apply(&mut engine, c, &clock, &writes, &commands, &done_tx, cfg.commit_timeout);
                    }
                    // A write (or the last commit) may have moved a commit point: commit it
                    // soon, not at the next tick.
                    if rt.store.is_none() && prompt_commit.is_none() && commit_linger < commit_tick.period() {
                        prompt_commit = Some(tokio::time::Instant::now() + commit_linger);
                    }
                }
                () = tokio::time::sleep_until(prompt_commit.unwrap_or(wake)), if prompt_commit.is_some() => {
                    prompt_commit = None;
                    rt.prompt_commit(&mut engine, &commands, &done_tx, cfg.commit_timeout);
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
                        commit_linger = new.commit_linger;
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
                        // Records of assignments waiting for what the sink stored are held.
                        let records = rt.hold(records);
                        engine.set_queued_bytes(queued.get() + rt.held_bytes);
                        if taking_records {
                            engine.on_records(records.iter().map(|r| r.view()), clock.now());
                        }
                    }
                    Some(ev) => rt.on_event(ev, &mut engine, &commands, &*fetcher),
                },
                _ = commit_tick.tick() => {
                    rt.commit_tick(&mut engine, &clock, &writes, &commands, &done_tx, cfg.commit_timeout);
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
            rt.answer_revokes(&mut engine, false, &*fetcher, &writes);
            if rt.fatal.is_some() {
                break;
            }

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
            let mut changes = engine.pause_changes();
            // Assignments waiting for what the sink stored stay paused until it answers.
            changes.resume.retain(|tp| !rt.awaiting.contains_key(tp));
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

        if let Some(message) = rt.fatal.take() {
            // Nothing more may be committed: the transactional sink cannot go on.
            tracing::error!(error = %message, "stopping: the exactly-once sink failed for good");
            rt.answer_revokes(&mut engine, true, &*fetcher, &writes);
            stop.cancel();
            let (tx, rx) = oneshot::channel();
            if commands.send(ConsumerCommand::Close { reply: tx }).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
            }
            return Err(PipelineError::Transaction(message));
        }
        // Final synchronous commit, then close the consumer.
        let drained = engine.is_idle();
        if !drained {
            tracing::warn!(
                pending_keys = engine.pending_keys(),
                "shutdown deadline passed; unfinished work is not committed"
            );
        }
        // The open transaction commits with the final offsets (exactly-once delivery).
        if rt.store.is_some() {
            rt.final_transaction(
                &mut engine,
                &clock,
                &writes,
                &commands,
                &done_tx,
                &mut done_rx,
                &mut events,
                &queued,
                &*fetcher,
                cfg.commit_timeout,
            )
            .await;
            if let Some(message) = rt.fatal.take() {
                rt.answer_revokes(&mut engine, true, &*fetcher, &writes);
                stop.cancel();
                let (tx, rx) = oneshot::channel();
                if commands.send(ConsumerCommand::Close { reply: tx }).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
                }
                return Err(PipelineError::Transaction(message));
            }
        }
        // Answer revokes still waiting so the consumer thread is not blocked.
        rt.answer_revokes(&mut engine, true, &*fetcher, &writes);
        // With offsets in the consumer group's transactions, nothing is committed besides.
        let (offsets, metadata) = group_commit(&mut engine, rt.store);
        if offsets.is_empty() {
            tracing::info!(
                "final commit: nothing left to commit (every consumed offset is committed)"
            );
        } else {
            let (tx, rx) = oneshot::channel();
            if commands
                .send(ConsumerCommand::Commit {
                    offsets: offsets.clone(),
                    metadata,
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
                                rt.answer_revokes(&mut engine, true, &*fetcher, &writes);
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

/// Where writes go: the at-least-once sink writer, or the transaction writer of an exactly-once
/// sink.
enum Writer {
    Plain(crate::dispatch::SinkWriter),
    Txn(TxnWriter),
}

impl Writer {
    fn send(&self, job: crate::engine::WriteJob) {
        match self {
            Writer::Plain(w) => w.send(job),
            Writer::Txn(w) => w.send(job),
        }
    }

    fn reconfigure(&self, cfg: &EngineConfig) {
        match self {
            Writer::Plain(w) => w.reconfigure(cfg),
            Writer::Txn(w) => w.reconfigure(cfg),
        }
    }

    fn txn(&self) -> Option<&TxnWriter> {
        match self {
            Writer::Txn(w) => Some(w),
            Writer::Plain(_) => None,
        }
    }
}

/// Records of an assignment that waits for what the sink stored (exactly-once delivery).
struct Awaiting {
    assignment: Assignment,
    held: Vec<OwnedRecord>,
    bytes: usize,
}

/// Looks up what the sink stored for new assignments, off the engine's task.
type StoredLookup = Box<dyn Fn(Vec<Assignment>) + Send + Sync>;

fn stored_lookup<S: Sink + ?Sized>(
    sink: Arc<S>,
    group_id: String,
    done: mpsc::UnboundedSender<Completion>,
    stop: CancellationToken,
) -> StoredLookup {
    Box::new(move |assignments: Vec<Assignment>| {
        let sink = sink.clone();
        let group_id = group_id.clone();
        let done = done.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let tps: Vec<TopicPartition> = assignments.iter().map(|a| a.tp.clone()).collect();
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                let r = tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    r = sink.stored_offsets(&group_id, &tps) => r,
                };
                match r {
                    Ok(stored) => {
                        let _ = done.send(Completion::Stored {
                            assignments,
                            result: Ok(stored),
                        });
                        return;
                    }
                    Err(e) => {
                        if attempt == 1 || attempt % 10 == 0 {
                            tracing::warn!(error = %e, attempt, partitions = tps.len(),
                                "cannot read the offsets the sink stored; the partitions wait");
                        }
                        let wait =
                            Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)));
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        });
    })
}

/// The runtime's view of the consumer: revokes waiting to be answered, group membership and
/// broker reachability; and, with an exactly-once sink, its transactions.
struct Runtime {
    revokes: Vec<PendingRevoke>,
    /// Sources whose outage gauge is set.
    outages: std::collections::BTreeSet<String>,
    joined: bool,
    /// Reachable, and what the client said last.
    broker: (bool, String),
    commit_in_flight: bool,
    /// Partitions of the subscribed topics in all (0 until the driver knows).
    total_partitions: usize,
    /// Where the consumer's group metadata is read.
    group_metadata: Option<GroupMetadataSource>,
    /// A commit was asked of the transaction writer and has not ended.
    txn_commit_in_flight: bool,
    /// Assignments waiting for what the sink stored, and their records meanwhile.
    awaiting: HashMap<TopicPartition, Awaiting>,
    held_bytes: usize,
    /// The transactional sink failed for good.
    fatal: Option<String>,
    /// Where the transactional sink stores offsets (`None`: at-least-once).
    store: Option<OffsetStore>,
    txn_timeout: Option<Duration>,
    stored: StoredLookup,
    /// The final transaction of a shutdown is being committed: one that cannot be committed
    /// aborts instead of waiting.
    finalizing: bool,
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
                let fresh: Vec<Assignment> = assignments
                    .iter()
                    .filter(|a| engine.assignment_of(&a.tp).as_ref() != Some(*a))
                    .cloned()
                    .collect();
                engine.assign(&assignments);
                // The engine owns the desired pause state: re-apply it after every assignment.
                let mut paused: Vec<TopicPartition> = engine.paused();
                if self.store.is_some() && !fresh.is_empty() {
                    // Exactly-once: a new assignment's records wait for what the sink stored.
                    for a in &fresh {
                        if let Some(old) = self.awaiting.remove(&a.tp) {
                            self.held_bytes = self.held_bytes.saturating_sub(old.bytes);
                        }
                        self.awaiting.insert(
                            a.tp.clone(),
                            Awaiting {
                                assignment: a.clone(),
                                held: Vec::new(),
                                bytes: 0,
                            },
                        );
                        if !paused.contains(&a.tp) {
                            paused.push(a.tp.clone());
                        }
                    }
                    (self.stored)(fresh);
                }
                if !paused.is_empty() {
                    let _ = commands.send(ConsumerCommand::Pause(paused));
                }
                self.ownership_changed(engine, fetcher);
            }
            ConsumerEvent::CommittedRanges(ranges) => {
                // At-least-once: records in the satisfied ranges of the last commit were
                // written before; they arrive satisfied. (Exactly-once sinks start from what the
                // sink stored, read on assignment.)
                if self.store.is_none() {
                    for (a, stored) in ranges {
                        if !stored.covered.is_empty() {
                            engine.start_from_stored(&a, stored);
                        }
                    }
                }
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
                self.drop_awaiting(&assignments);
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
                    wait_txn: None,
                });
            }
            ConsumerEvent::Lost(assignments) => {
                tracing::warn!(partitions = assignments.len(), "partitions lost");
                self.drop_awaiting(&assignments);
                engine.lose(&assignments);
                self.ownership_changed(engine, fetcher);
            }
            ConsumerEvent::Positions(positions) => engine.observe_positions(&positions),
            ConsumerEvent::PartitionCount(total) => {
                if total != self.total_partitions {
                    tracing::info!(total, "partitions of the subscribed topics");
                    self.total_partitions = total;
                    self.ownership_changed(engine, fetcher);
                }
            }
            ConsumerEvent::GroupMetadata(source) => self.group_metadata = Some(source),
            ConsumerEvent::Broker { reachable, reason } => self.broker = (reachable, reason),
            ConsumerEvent::Error { message, fatal } => {
                if fatal {
                    tracing::error!(error = %message, "fatal consumer error");
                }
            }
        }
    }

    /// Tell the fetcher which share of the group's partitions this instance owns.
    fn ownership_changed<F: Fetcher + ?Sized>(&self, engine: &Engine, fetcher: &F) {
        let owned = engine.owned_partitions().len();
        // Before the driver knows the total, an instance that owns partitions takes the whole
        // budget rather than none (a total below what it owns is out of date).
        let total = if self.total_partitions >= owned {
            self.total_partitions
        } else {
            0
        };
        fetcher.ownership_changed(OwnershipShare { owned, total });
    }

    fn drop_awaiting(&mut self, assignments: &[Assignment]) {
        for a in assignments {
            if self
                .awaiting
                .get(&a.tp)
                .is_some_and(|w| w.assignment.same(a))
            {
                if let Some(w) = self.awaiting.remove(&a.tp) {
                    self.held_bytes = self.held_bytes.saturating_sub(w.bytes);
                }
            }
        }
    }

    /// Keep the records of assignments that wait for what the sink stored; return the rest.
    fn hold(&mut self, records: Vec<OwnedRecord>) -> Vec<OwnedRecord> {
        if self.awaiting.is_empty() {
            return records;
        }
        let mut rest = Vec::with_capacity(records.len());
        for r in records {
            let waiting = self
                .awaiting
                .iter_mut()
                .find(|(tp, _)| *tp.topic == *r.topic && tp.partition == r.partition);
            match waiting {
                Some((_, w)) => {
                    let n = r.size();
                    w.bytes += n;
                    self.held_bytes += n;
                    w.held.push(r);
                }
                None => rest.push(r),
            }
        }
        rest
    }

    /// The commit interval passed: commit the open transaction (exactly-once), and commit
    /// offsets to the consumer group (unless they go to the group inside the transactions).
    fn commit_tick(
        &mut self,
        engine: &mut Engine,
        clock: &Clock,
        writes: &Writer,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        done: &mpsc::UnboundedSender<Completion>,
        timeout: Duration,
    ) {
        if let Some(w) = writes.txn() {
            if !self.txn_commit_in_flight && self.fatal.is_none() {
                let plan = engine.transaction_plan();
                if plan.must_abort {
                    w.abort();
                    self.txn_commit_in_flight = true;
                } else if !plan.is_empty() {
                    if plan.fits || !self.transaction_near_timeout(engine, clock) {
                        w.commit();
                    } else {
                        tracing::warn!(
                            "the satisfied ranges to store do not fit the sink and the transaction nears its timeout: aborting it"
                        );
                        w.abort();
                    }
                    self.txn_commit_in_flight = true;
                }
            }
        }
        self.send_group_commit(engine, commands, done, timeout);
    }

    /// Commit to the consumer group what [`group_commit`] offers, unless a commit is in flight
    /// (its completion arms the next one).
    fn send_group_commit(
        &mut self,
        engine: &mut Engine,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        done: &mpsc::UnboundedSender<Completion>,
        timeout: Duration,
    ) {
        if self.commit_in_flight {
            return;
        }
        let (offsets, metadata) = group_commit(engine, self.store);
        if !offsets.is_empty() {
            self.commit_in_flight = true;
            spawn_commit(commands, offsets, metadata, done.clone(), timeout);
        }
    }

    /// At-least-once: commit the points that moved now, unless a commit is in flight (its
    /// completion arms the next one).
    fn prompt_commit(
        &mut self,
        engine: &mut Engine,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        done: &mpsc::UnboundedSender<Completion>,
        timeout: Duration,
    ) {
        if self.store.is_none() && self.fatal.is_none() {
            self.send_group_commit(engine, commands, done, timeout);
        }
    }

    /// Has the open transaction used most of the sink's transaction timeout?
    fn transaction_near_timeout(&self, engine: &Engine, clock: &Clock) -> bool {
        match (self.txn_timeout, engine.transaction_age(clock.now())) {
            (Some(timeout), Some(age)) => age >= timeout.mul_f64(0.8),
            _ => false,
        }
    }

    /// Apply a completion to the engine.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        engine: &mut Engine,
        c: Completion,
        clock: &Clock,
        writes: &Writer,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        done: &mpsc::UnboundedSender<Completion>,
        timeout: Duration,
    ) {
        let now = clock.now();
        match c {
            Completion::TxnWritten(results) => {
                for (key, flight, r, txn) in results {
                    engine.on_transactional_write_done(&key, flight, r, txn, now);
                }
            }
            Completion::TxnReady { txn, dirty, reply } => {
                let plan = engine.transaction_plan();
                let go = if plan.transaction != txn {
                    TxnGo::Abort(format!(
                        "the engine is at transaction {}, the writer at {txn}",
                        plan.transaction
                    ))
                } else if plan.must_abort {
                    TxnGo::Abort("an assignment whose writes it holds ended".into())
                } else if !plan.fits {
                    let must = self.finalizing
                        || !self.revokes.is_empty()
                        || self.transaction_near_timeout(engine, clock);
                    if must {
                        TxnGo::Abort("the satisfied ranges to store do not fit the sink".into())
                    } else {
                        TxnGo::Postpone
                    }
                } else if plan.is_empty() && !dirty {
                    // Nothing written, nothing to store: an empty commit ends the transaction
                    // cheaply (a revoke may wait for it).
                    TxnGo::Commit {
                        offsets: Vec::new(),
                        group_metadata: None,
                    }
                } else {
                    TxnGo::Commit {
                        offsets: plan.offsets,
                        group_metadata: self
                            .group_metadata
                            .as_ref()
                            .and_then(GroupMetadataSource::current),
                    }
                };
                if matches!(go, TxnGo::Postpone) {
                    self.txn_commit_in_flight = false;
                }
                let _ = reply.send(go);
            }
            Completion::TxnEnded { txn, result } => {
                self.txn_commit_in_flight = false;
                match result {
                    Ok(offsets) => {
                        engine.transaction_committed(txn, &offsets, now);
                        // The consumer group's offsets follow the sink's, for lag tooling.
                        if self.store == Some(OffsetStore::Sink) {
                            self.send_group_commit(engine, commands, done, timeout);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(txn, error = %e, "transaction aborted: fetching again what it held");
                        engine.transaction_aborted(txn, now);
                    }
                }
            }
            Completion::TxnFatal(message) => {
                self.txn_commit_in_flight = false;
                self.fatal = Some(message);
            }
            Completion::Stored {
                assignments,
                result,
            } => {
                let stored = match result {
                    Ok(s) => s,
                    Err(e) => {
                        // The lookup retries on its own; it only ends with an answer.
                        tracing::warn!(error = %e, "stored offsets unavailable");
                        return;
                    }
                };
                let mut resume = Vec::new();
                let paused = engine.paused();
                for a in assignments {
                    let waiting = self
                        .awaiting
                        .get(&a.tp)
                        .is_some_and(|w| w.assignment.same(&a));
                    if !waiting {
                        continue;
                    }
                    let Some(w) = self.awaiting.remove(&a.tp) else {
                        continue;
                    };
                    self.held_bytes = self.held_bytes.saturating_sub(w.bytes);
                    if let Some((_, s)) = stored.iter().find(|(tp, _)| *tp == a.tp) {
                        engine.start_from_stored(&a, s.clone());
                    }
                    if !w.held.is_empty() {
                        engine.on_records(w.held.iter().map(OwnedRecord::view), now);
                    }
                    if !paused.contains(&a.tp) {
                        resume.push(a.tp.clone());
                    }
                }
                if !resume.is_empty() {
                    let _ = commands.send(ConsumerCommand::Resume(resume));
                }
            }
            other => {
                let _ = writes;
                apply_completion(engine, other, clock, &mut self.commit_in_flight);
            }
        }
    }

    /// Answer revokes whose writes drained or whose deadline passed (all of them with `all`).
    /// With an exactly-once sink, a drained revoke first waits for the transaction that held
    /// its writes to end (it asks for a commit).
    fn answer_revokes<F: Fetcher + ?Sized>(
        &mut self,
        engine: &mut Engine,
        all: bool,
        fetcher: &F,
        writes: &Writer,
    ) {
        if self.revokes.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut i = 0;
        let mut answered = false;
        while i < self.revokes.len() {
            let r = &mut self.revokes[i];
            let late = now >= r.deadline;
            let mut ready = all || late || engine.revoke_drained(&r.assignments);
            if ready && !all && !late {
                if let (Some(w), Some(open)) = (writes.txn(), engine.open_transaction()) {
                    let wait = *r.wait_txn.get_or_insert(open);
                    if open <= wait {
                        if !self.txn_commit_in_flight && self.fatal.is_none() {
                            w.commit();
                            self.txn_commit_in_flight = true;
                        }
                        ready = false;
                    }
                }
            }
            if ready {
                let r = self.revokes.swap_remove(i);
                let mut offsets = engine.revoke_finish(&r.assignments);
                if self.store == Some(OffsetStore::Group) || self.fatal.is_some() {
                    // The offsets went to the group inside the transaction (or must not go).
                    offsets.clear();
                }
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
            self.ownership_changed(engine, fetcher);
        }
    }

    /// At shutdown, commit the open transaction with the final offsets, serving completions and
    /// consumer events meanwhile, within `timeout`.
    #[allow(clippy::too_many_arguments)]
    async fn final_transaction<F: Fetcher + ?Sized>(
        &mut self,
        engine: &mut Engine,
        clock: &Clock,
        writes: &Writer,
        commands: &mpsc::UnboundedSender<ConsumerCommand>,
        done_tx: &mpsc::UnboundedSender<Completion>,
        done_rx: &mut mpsc::UnboundedReceiver<Completion>,
        events: &mut mpsc::UnboundedReceiver<ConsumerEvent>,
        queued: &crate::consumer::QueuedBytes,
        fetcher: &F,
        timeout: Duration,
    ) {
        let Some(w) = writes.txn() else {
            return;
        };
        if self.fatal.is_some() {
            return;
        }
        let Some(start) = engine.open_transaction() else {
            return;
        };
        self.finalizing = true;
        let until = tokio::time::Instant::now() + timeout;
        let mut asked = false;
        let mut consumer_open = true;
        loop {
            if self.fatal.is_some() || engine.open_transaction().is_some_and(|t| t > start) {
                break;
            }
            if !self.txn_commit_in_flight && !asked {
                w.commit();
                self.txn_commit_in_flight = true;
                asked = true;
            }
            tokio::select! {
                c = done_rx.recv() => match c {
                    Some(c) => self.apply(engine, c, clock, writes, commands, done_tx, timeout),
                    None => break,
                },
                () = tokio::time::sleep_until(until) => {
                    tracing::warn!("the final transaction did not commit in time; it is not committed");
                    break;
                }
                ev = events.recv(), if consumer_open => match ev {
                    None => consumer_open = false,
                    Some(ConsumerEvent::Records(records)) => queued.sub(&records),
                    Some(ev) => {
                        self.on_event(ev, engine, commands, fetcher);
                        self.answer_revokes(engine, true, fetcher, writes);
                    }
                },
            }
            if !self.txn_commit_in_flight
                && asked
                && engine.open_transaction().is_some_and(|t| t <= start)
            {
                // Postponed (what to store did not fit): ask once more, as an abort if it
                // still does not fit near the end.
                asked = false;
            }
        }
    }
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
        Completion::TxnWritten(_)
        | Completion::TxnReady { .. }
        | Completion::TxnEnded { .. }
        | Completion::TxnFatal(_)
        | Completion::Stored { .. } => {
            // Served by `Runtime::apply`.
        }
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

/// What to commit to the consumer group now, by where the offsets are stored: nothing besides
/// the transactions when they go to the group inside them (Kafka exactly-once), the commit
/// points alone when the sink stores them (PostgreSQL exactly-once: the group's follow, for lag
/// tooling), the commit points with the satisfied ranges above them otherwise (at-least-once).
fn group_commit(engine: &mut Engine, store: Option<OffsetStore>) -> (Offsets, CommitMetadata) {
    match store {
        Some(OffsetStore::Group) => (Vec::new(), Vec::new()),
        Some(OffsetStore::Sink) => (engine.commits(), Vec::new()),
        None => engine.commits_with_ranges(),
    }
}

fn spawn_commit(
    commands: &mpsc::UnboundedSender<ConsumerCommand>,
    offsets: Offsets,
    metadata: CommitMetadata,
    done: mpsc::UnboundedSender<Completion>,
    timeout: Duration,
) {
    let (tx, rx) = oneshot::channel();
    if commands
        .send(ConsumerCommand::Commit {
            offsets: offsets.clone(),
            metadata,
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
// Actions are moved once each, right away; boxing them would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
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
