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

use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::consumer::{ConsumerChannels, ConsumerCommand, ConsumerEvent, Offsets};
use crate::decode::NotificationDecoder;
use crate::dispatch::{
    Completion, DeadLetterWriter, FetchDispatcher, dispatch_dead_letter, start_sink_writer,
};
use crate::engine::{Action, Decoders, Engine, EngineStatus, RefreshOutcome, TopicPartition};
use crate::fetch::Fetcher;
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
    ResetGoneGuard,
    Shutdown,
}

/// The state of a running pipeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The engine's figures.
    pub engine: EngineStatus,
    /// The consumer joined the group (received an assignment, possibly empty).
    pub joined: bool,
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

    /// Allow deletes again after the gone guard tripped.
    pub fn reset_gone_guard(&self) {
        let _ = self.tx.send(Control::ResetGoneGuard);
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
    partitions: Vec<TopicPartition>,
    reply: std::sync::mpsc::SyncSender<Offsets>,
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
                        p.check(Duration::from_secs(10)).await?;
                        Arc::new(p)
                    }
                };
                (start_consumer(&k, cfg.rebalance_drain)?, writer)
            }
            Source::Channels(c) => (
                c,
                dead_letters.ok_or(PipelineError::Missing("a dead-letter writer"))?,
            ),
        };
        let ConsumerChannels {
            mut events,
            commands,
        } = channels;

        let handles_fetcher = fetcher.clone();
        let mut engine = Engine::new(
            cfg.clone(),
            decoders,
            Box::new(move |t: &str| handles_fetcher.handles(t)),
            sink.tracks_versions(),
        );
        let clock = Clock::start();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Completion>();
        let fetches = FetchDispatcher {
            fetcher: fetcher.clone(),
            sink: sink.clone(),
            done: done_tx.clone(),
        };
        let writes = start_sink_writer(sink.clone(), &cfg, done_tx.clone());

        let mut revokes: Vec<PendingRevoke> = Vec::new();
        let mut refreshes: HashMap<u64, (usize, usize)> = HashMap::new();
        let mut refresh_requests: HashMap<usize, RefreshRequest> = HashMap::new();
        let mut next_waiter = 1u64;
        let mut next_request = 1usize;
        let mut joined = false;
        let mut commit_in_flight = false;
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
                .chain(revokes.iter().map(|r| r.deadline))
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
                    apply_completion(&mut engine, c, &clock, &mut commit_in_flight);
                    // Drain whatever else completed, cheaply.
                    while let Ok(c) = done_rx.try_recv() {
                        apply_completion(&mut engine, c, &clock, &mut commit_in_flight);
                    }
                }
                Some(ctl) = control_rx.recv() => match ctl {
                    Control::Status(reply) => {
                        let _ = reply.send(status_of(&engine, &clock, joined, shutdown_deadline.is_some()));
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
                    Control::ResetGoneGuard => {
                        tracing::info!("gone guard reset by operator");
                        engine.reset_gone_guard();
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
                        if taking_records {
                            let now = clock.now();
                            for r in &records {
                                engine.on_record(&r.view(), now);
                            }
                            crate::metrics::record_batch(records.len());
                        }
                    }
                    Some(ConsumerEvent::Assigned(tps)) => {
                        joined = true;
                        tracing::info!(partitions = tps.len(), "partitions assigned");
                        engine.assign(&tps);
                        // The engine owns the desired pause state: re-apply it.
                        let paused: Vec<TopicPartition> = engine.paused();
                        if !paused.is_empty() {
                            let _ = commands.send(ConsumerCommand::Pause(paused));
                        }
                    }
                    Some(ConsumerEvent::Revoke { partitions, reply }) => {
                        tracing::info!(partitions = partitions.len(), "partitions revoked: draining");
                        engine.revoke_begin(&partitions);
                        revokes.push(PendingRevoke {
                            partitions,
                            reply,
                            deadline: tokio::time::Instant::now() + cfg.rebalance_drain,
                        });
                    }
                    Some(ConsumerEvent::Lost(tps)) => {
                        tracing::warn!(partitions = tps.len(), "partitions lost");
                        engine.lose(&tps);
                    }
                    Some(ConsumerEvent::Error { message, fatal }) => {
                        if fatal {
                            tracing::error!(error = %message, "fatal consumer error; shutting down");
                            if shutdown_deadline.is_none() {
                                begin_shutdown(&mut engine, &clock, &cfg, &mut shutdown_deadline);
                            }
                        }
                    }
                },
                _ = commit_tick.tick(), if !commit_in_flight => {
                    let offsets = engine.commits();
                    if !offsets.is_empty() {
                        commit_in_flight = true;
                        spawn_commit(&commands, offsets, done_tx.clone());
                    }
                    let st = engine.status(clock.now());
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
            let now_i = tokio::time::Instant::now();
            let mut i = 0;
            while i < revokes.len() {
                if engine.revoke_drained(&revokes[i].partitions) || now_i >= revokes[i].deadline {
                    let r = revokes.swap_remove(i);
                    let offsets = engine.revoke_finish(&r.partitions);
                    tracing::info!(
                        partitions = r.partitions.len(),
                        commits = offsets.len(),
                        "revoke drained"
                    );
                    let _ = r.reply.send(offsets);
                } else {
                    i += 1;
                }
            }

            let now = clock.now();
            engine.poll(now);
            for action in engine.take_actions_grouped() {
                match action {
                    Grouped::Fetches(jobs) => fetches.dispatch(jobs),
                    Grouped::Other(Action::Write(job)) => {
                        let _ = writes.send(job);
                    }
                    Grouped::Other(Action::DeadLetter(job)) => {
                        dispatch_dead_letter(dead_letters.clone(), job, done_tx.clone());
                    }
                    Grouped::Other(Action::Fetch(job)) => fetches.dispatch(vec![job]),
                }
            }
            let changes = engine.pause_changes();
            if !changes.pause.is_empty() {
                tracing::info!(
                    partitions = changes.pause.len(),
                    pending_keys = engine.pending_keys(),
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
        for r in revokes.drain(..) {
            let offsets = engine.revoke_finish(&r.partitions);
            let _ = r.reply.send(offsets);
        }
        let offsets = engine.commits();
        if offsets.is_empty() {
            tracing::info!(
                "final commit: nothing left to commit (every consumed offset is committed)"
            );
        } else {
            let (tx, rx) = oneshot::channel();
            let plain: Offsets = offsets.iter().map(|(tp, _, o)| (tp.clone(), *o)).collect();
            if commands
                .send(ConsumerCommand::Commit {
                    offsets: plain,
                    reply: tx,
                })
                .is_ok()
            {
                match tokio::time::timeout(Duration::from_secs(10), rx).await {
                    Ok(Ok(Ok(()))) => {
                        for (tp, epoch, o) in &offsets {
                            engine.committed(tp, *epoch, *o);
                        }
                        tracing::info!(partitions = offsets.len(), "final commit done");
                    }
                    Ok(Ok(Err(e))) => tracing::warn!(error = %e, "final commit failed"),
                    _ => tracing::warn!("final commit did not complete"),
                }
            }
        }
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

fn status_of(engine: &Engine, clock: &Clock, joined: bool, shutting_down: bool) -> Status {
    let engine_status = engine.status(clock.now());
    let mut not_ready = Vec::new();
    if !joined {
        not_ready.push("not yet joined the consumer group".to_owned());
    }
    if engine_status.gone_guard_tripped {
        not_ready.push(format!(
            "gone guard tripped ({:.0}% of recent fetches said gone): deletes are held",
            engine_status.gone_ratio * 100.0
        ));
    }
    if engine_status.dead_letter_broken {
        not_ready.push("dead-letter topic refuses writes".to_owned());
    }
    if shutting_down {
        not_ready.push("shutting down".to_owned());
    }
    Status {
        engine: engine_status,
        joined,
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
        Completion::DeadLettered { id, result } => engine.on_dead_letter_done(id, result),
        Completion::Committed { offsets, result } => {
            *commit_in_flight = false;
            match result {
                Ok(()) => {
                    for (tp, epoch, o) in offsets {
                        engine.committed(&tp, epoch, o);
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
    offsets: Vec<(TopicPartition, u32, i64)>,
    done: mpsc::UnboundedSender<Completion>,
) {
    let (tx, rx) = oneshot::channel();
    let plain: Offsets = offsets.iter().map(|(tp, _, o)| (tp.clone(), *o)).collect();
    if commands
        .send(ConsumerCommand::Commit {
            offsets: plain,
            reply: tx,
        })
        .is_err()
    {
        let _ = done.send(Completion::Committed {
            offsets,
            result: Err("consumer closed".into()),
        });
        return;
    }
    tokio::spawn(async move {
        let result = match rx.await {
            Ok(r) => r,
            Err(_) => Err("consumer closed".into()),
        };
        let _ = done.send(Completion::Committed { offsets, result });
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
