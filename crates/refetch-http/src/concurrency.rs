//! The concurrency limit of a source, changeable live.
//!
//! A semaphore whose size can grow or shrink while calls are in flight. Growing adds permits at
//! once. Shrinking takes the free permits away at once and, for the part of the cut that is still
//! in use, lets the next permits that come back lapse instead of returning, so the number in
//! flight never exceeds the new limit once the calls admitted before the change are done, and no
//! caller is interrupted. `0` means unlimited (a very large semaphore).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The size used for "unlimited".
const UNLIMITED: usize = Semaphore::MAX_PERMITS / 2;

/// A resizable concurrency limit.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    semaphore: Arc<Semaphore>,
    /// The configured limit (0: unlimited).
    limit: AtomicUsize,
    /// Permits still in use that must lapse when they come back.
    debt: Arc<AtomicUsize>,
}

/// One call's place; it goes back (or lapses, after a cut) when dropped.
#[derive(Debug)]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let owed = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1));
        if owed.is_ok() {
            permit.forget();
        }
    }
}

fn size(limit: usize) -> usize {
    if limit == 0 { UNLIMITED } else { limit }
}

impl ConcurrencyLimit {
    /// At most `limit` calls at once (0: unlimited).
    pub fn new(limit: usize) -> Self {
        ConcurrencyLimit {
            semaphore: Arc::new(Semaphore::new(size(limit))),
            limit: AtomicUsize::new(limit),
            debt: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The configured limit (0: unlimited).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Wait for a place. `None` only if the limit was closed (never, in practice).
    pub async fn acquire(&self) -> Option<Slot> {
        let permit = self.semaphore.clone().acquire_owned().await.ok()?;
        Some(Slot {
            permit: Some(permit),
            debt: self.debt.clone(),
        })
    }

    /// Change the limit live.
    pub fn resize(&self, limit: usize) {
        let old = self.limit.swap(limit, Ordering::AcqRel);
        let (from, to) = (size(old), size(limit));
        if to > from {
            let mut grow = to - from;
            // Cancel debt first: those permits are still counted in the semaphore's size.
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let paid = d.min(grow);
                    Some(d - paid)
                })
                .map(|d| grow -= d.min(grow));
            self.semaphore.add_permits(grow);
        } else if from > to {
            let cut = from - to;
            let forgotten = self.semaphore.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shrinking_waits_for_calls_in_flight_and_growing_is_immediate() {
        let limit = ConcurrencyLimit::new(4);
        let held: Vec<Slot> = futures::future::join_all((0..4).map(|_| limit.acquire()))
            .await
            .into_iter()
            .map(|s| s.expect("slot"))
            .collect();
        limit.resize(2);
        assert_eq!(limit.limit(), 2);
        let mut held = held;
        // Two of the four return and lapse; only then does a place free up.
        held.pop();
        held.pop();
        assert_eq!(limit.semaphore.available_permits(), 0);
        held.pop();
        assert_eq!(limit.semaphore.available_permits(), 1);
        held.clear();
        assert_eq!(limit.semaphore.available_permits(), 2);

        let a = limit.acquire().await.expect("slot");
        let _b = limit.acquire().await.expect("slot");
        limit.resize(3);
        let _c = limit.acquire().await.expect("grown at once");
        assert_eq!(limit.semaphore.available_permits(), 0);
        drop(a);
        assert_eq!(limit.semaphore.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_cut_then_a_raise_before_calls_return_cancels_the_debt() {
        let limit = ConcurrencyLimit::new(3);
        let held: Vec<Slot> = futures::future::join_all((0..3).map(|_| limit.acquire()))
            .await
            .into_iter()
            .map(|s| s.expect("slot"))
            .collect();
        limit.resize(1);
        limit.resize(3);
        drop(held);
        assert_eq!(limit.semaphore.available_permits(), 3);
        limit.resize(0);
        assert!(limit.semaphore.available_permits() >= 1000);
        limit.resize(2);
        assert_eq!(limit.semaphore.available_permits(), 2);
    }
}
