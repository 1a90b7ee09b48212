//! Assignments: a topic partition together with the epoch in which this member owns it.
//!
//! A partition can be revoked and assigned straight back while work of the old assignment is
//! still in flight (a write waiting on a slow sink, a commit queued before the revoke, a revoke
//! whose handler gave up). Everything that belongs to an assignment therefore carries the
//! [`Assignment`] value, not just the partition: revoke and lose events from the consumer,
//! pending revokes, commit commands, and (through a [`Fence`]) fetch and write jobs. A
//! completion, commit or revoke of an older epoch cannot touch the current one: the engine and
//! the consumer drivers compare the epoch before acting.
//!
//! Epochs are handed out by the consumer driver (monotonic per driver), so the driver can drop a
//! queued commit whose epoch is no longer current without asking the engine.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The epoch of one assignment of a partition to this member. Increases with every assignment
/// a driver makes; never reused within a driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// One assignment: a partition and the epoch in which it is owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Assignment {
    /// The partition.
    pub tp: TopicPartition,
    /// The epoch of this assignment.
    pub epoch: Epoch,
}

impl Assignment {
    /// An assignment of `tp` in `epoch`.
    pub fn new(tp: TopicPartition, epoch: Epoch) -> Self {
        Assignment { tp, epoch }
    }

    /// Is `other` the same assignment (same partition, same epoch)?
    pub fn same(&self, other: &Assignment) -> bool {
        self.epoch == other.epoch && self.tp == other.tp
    }
}

impl std::fmt::Display for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.tp, self.epoch)
    }
}

/// Hands out epochs for a consumer driver.
#[derive(Debug, Default)]
pub struct EpochCounter {
    next: u64,
}

impl EpochCounter {
    /// A counter starting at epoch 1.
    pub fn new() -> Self {
        EpochCounter { next: 1 }
    }

    /// The next epoch.
    pub fn next_epoch(&mut self) -> Epoch {
        let e = Epoch(self.next.max(1));
        self.next = e.0 + 1;
        e
    }
}

/// The cancellation signal of one assignment: cancelled when the assignment ends (revoked and
/// let go, or lost). Cheap to clone; clones compare equal.
#[derive(Debug, Clone)]
pub struct AssignmentToken {
    id: u64,
    token: CancellationToken,
}

impl AssignmentToken {
    /// A new, live token; `id` must be unique per assignment within an engine.
    pub(crate) fn new(id: u64) -> Self {
        AssignmentToken {
            id,
            token: CancellationToken::new(),
        }
    }

    /// End the assignment: every job fenced only by it stops.
    pub(crate) fn cancel(&self) {
        self.token.cancel();
    }

    /// Has the assignment ended?
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// The liveness of the assignments a job works for.
///
/// A fetch or write job is live while at least one of the assignments whose notifications it
/// serves is current; when all of them ended (revoked and let go, or lost) the dispatcher drops
/// the job: it abandons a fetch, stops retrying a write, and drops a write attempt that has not
/// completed (a zombie write of the old owner must not land after the new owner's). A fence with
/// no assignment (an on-demand refresh, not tied to a Kafka offset) never ends.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    tokens: smallvec::SmallVec<[AssignmentToken; 1]>,
}

impl Fence {
    /// A fence that never ends (work not tied to any assignment).
    pub fn unfenced() -> Self {
        Fence::default()
    }

    /// A fence that has already ended (work whose assignments are all gone).
    pub fn ended_already() -> Self {
        let t = AssignmentToken::new(0);
        t.cancel();
        Fence {
            tokens: smallvec::smallvec![t],
        }
    }

    /// A fence over the given assignment tokens (duplicates are skipped).
    pub(crate) fn of(tokens: impl IntoIterator<Item = AssignmentToken>) -> Self {
        let mut f = Fence::default();
        for t in tokens {
            f.add(t);
        }
        f
    }

    pub(crate) fn add(&mut self, token: AssignmentToken) {
        if !self.tokens.iter().any(|t| t.id == token.id) {
            self.tokens.push(token);
        }
    }

    /// Merge another fence into this one.
    pub fn merge(&mut self, other: &Fence) {
        for t in &other.tokens {
            self.add(t.clone());
        }
    }

    /// Is the job still live (no assignment, or at least one assignment still current)?
    pub fn is_live(&self) -> bool {
        self.tokens.is_empty() || self.tokens.iter().any(|t| !t.is_cancelled())
    }

    /// Does this fence never end?
    pub fn is_unfenced(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Resolves when every assignment of the fence ended (never, for an unfenced job).
    pub async fn ended(&self) {
        if self.tokens.is_empty() {
            std::future::pending::<()>().await;
        }
        for t in &self.tokens {
            t.token.cancelled().await;
        }
    }

    /// Resolves when any assignment of the fence ends (never, for an unfenced job). A batch of
    /// writes uses it to drop an attempt that includes a write gone stale.
    pub async fn any_ended(&self) {
        if self.tokens.is_empty() {
            std::future::pending::<()>().await;
        }
        let waits = self.tokens.iter().map(|t| Box::pin(t.token.cancelled()));
        futures::future::select_all(waits).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_increase() {
        let mut c = EpochCounter::new();
        let a = c.next_epoch();
        let b = c.next_epoch();
        assert!(b > a);
        assert_eq!(a, Epoch(1));
    }

    #[tokio::test]
    async fn a_fence_is_live_while_one_assignment_is() {
        let a = AssignmentToken::new(1);
        let b = AssignmentToken::new(2);
        let f = Fence::of([a.clone(), b.clone(), a.clone()]);
        assert_eq!(f.tokens.len(), 2, "clones of one token count once");
        assert!(f.is_live());
        a.cancel();
        assert!(f.is_live(), "b is still current");
        b.cancel();
        assert!(!f.is_live());
        f.ended().await;
        assert!(Fence::unfenced().is_live());
    }
}
