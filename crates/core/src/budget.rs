//! The dirty-bytes budget: writers wait here, before they lock a block, while dirty data is
//! over its limit. Nothing dirty is ever dropped to make room.
//!
//! A semaphore cannot change its size at runtime, so this is a counter with a limit behind a
//! std mutex (never held across an await) and a `Notify` for waiters.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug)]
struct Counts {
    used: u64,
    limit: u64,
    waiters: u64,
}

/// A byte budget with a limit that can change at runtime.
#[derive(Debug)]
pub(crate) struct Budget {
    counts: Mutex<Counts>,
    freed: Notify,
}

/// Bytes taken from a [`Budget`]; what is left of them goes back when this is dropped.
#[derive(Debug)]
pub(crate) struct Credit {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Credit {
    /// Turns up to `n` bytes of this credit into dirty data that an entry now holds (they
    /// stay taken from the budget until the entry is clean or removed).
    pub(crate) fn spend(&mut self, n: u64) {
        self.bytes = self.bytes.saturating_sub(n);
    }

    /// Takes back `n` bytes that an entry no longer holds.
    pub(crate) fn refund(&mut self, n: u64) {
        self.bytes += n;
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.bytes));
    }
}

/// A writer counted among the waiters until it is granted or gives up (its future dropped).
struct Waiting<'a> {
    budget: &'a Budget,
    registered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.registered {
            self.budget
                .counts
                .lock()
                .expect("budget mutex poisoned")
                .waiters -= 1;
        }
    }
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            counts: Mutex::new(Counts {
                used: 0,
                limit,
                waiters: 0,
            }),
            freed: Notify::new(),
        }
    }

    /// Takes `n` bytes, waiting while that would exceed the limit. `pressure` is notified
    /// while waiting so that the commit task uploads dirty data. A request larger than the
    /// limit is granted once nothing else is in use, so it cannot wait forever. With
    /// `patience`, gives up (`Err` with how long it waited) once nothing was released for
    /// that long: dirty data is not leaving (the store is down).
    ///
    /// Cancel-safe: a dropped wait takes nothing and no longer counts as a waiter.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        n: u64,
        pressure: &Notify,
        patience: Option<Duration>,
    ) -> Result<Credit, Duration> {
        let started = tokio::time::Instant::now();
        let mut waiting = Waiting {
            budget: self,
            registered: false,
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut c = self.counts.lock().expect("budget mutex poisoned");
                if c.used + n <= c.limit || c.used == 0 {
                    c.used += n;
                    if waiting.registered {
                        c.waiters -= 1;
                        waiting.registered = false;
                    }
                    return Ok(Credit {
                        budget: Arc::clone(self),
                        bytes: n,
                    });
                }
                if !waiting.registered {
                    c.waiters += 1;
                    waiting.registered = true;
                }
            }
            pressure.notify_one();
            match patience {
                None => freed.await,
                Some(p) => {
                    if tokio::time::timeout(p, freed).await.is_err() {
                        return Err(started.elapsed());
                    }
                }
            }
        }
    }

    /// Adds `n` bytes without waiting (dirty data found at start-up).
    pub(crate) fn force(&self, n: u64) {
        self.counts.lock().expect("budget mutex poisoned").used += n;
    }

    /// Returns `n` bytes.
    pub(crate) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        {
            let mut c = self.counts.lock().expect("budget mutex poisoned");
            c.used = c.used.saturating_sub(n);
        }
        self.freed.notify_waiters();
    }

    /// Changes the limit.
    pub(crate) fn set_limit(&self, limit: u64) {
        self.counts.lock().expect("budget mutex poisoned").limit = limit;
        self.freed.notify_waiters();
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> u64 {
        self.counts.lock().expect("budget mutex poisoned").limit
    }

    /// Whether writers are waiting or the budget is over its limit.
    pub(crate) fn under_pressure(&self) -> bool {
        let c = self.counts.lock().expect("budget mutex poisoned");
        c.waiters > 0 || c.used > c.limit
    }

    /// Bytes in use (dirty data plus what open write handles reserved), and writers waiting.
    pub(crate) fn used_and_waiters(&self) -> (u64, u64) {
        let c = self.counts.lock().expect("budget mutex poisoned");
        (c.used, c.waiters)
    }

    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used_and_waiters().0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn waits_until_released_and_signals_pressure() {
        let budget = Arc::new(Budget::new(10));
        let pressure = Arc::new(Notify::new());
        let first = budget.acquire(8, &pressure, None).await.expect("free");
        let (b, p) = (budget.clone(), pressure.clone());
        let waiter = tokio::spawn(async move {
            std::mem::forget(b.acquire(5, &p, None).await.expect("no patience"))
        });
        pressure.notified().await;
        assert!(budget.under_pressure());
        assert!(!waiter.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("granted after release")
            .expect("join");
        assert_eq!(budget.used(), 5);
        assert!(!budget.under_pressure());
    }

    #[tokio::test]
    async fn oversized_request_is_granted_when_idle_and_limit_can_grow() {
        let budget = Arc::new(Budget::new(4));
        let pressure = Notify::new();
        let big = budget.acquire(100, &pressure, None).await.expect("idle");
        assert_eq!(budget.used(), 100);
        drop(big);
        budget.set_limit(1000);
        let a = budget.acquire(600, &pressure, None).await.expect("fits");
        let b = budget.acquire(400, &pressure, None).await.expect("fits");
        assert_eq!(budget.used(), 1000);
        drop((a, b));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_no_waiter_and_takes_nothing() {
        let budget = Arc::new(Budget::new(10));
        let pressure = Notify::new();
        let held = budget.acquire(10, &pressure, None).await.expect("free");
        {
            let wait = budget.acquire(5, &pressure, None);
            tokio::pin!(wait);
            // Polled once: registered as a waiter, then dropped.
            assert!(futures::poll!(wait.as_mut()).is_pending());
            assert!(budget.under_pressure());
        }
        assert_eq!(budget.used_and_waiters(), (10, 0));
        assert!(!budget.under_pressure());
        let mut credit = held;
        credit.spend(4);
        drop(credit);
        assert_eq!(budget.used(), 4, "spent bytes stay taken until released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_gives_up_only_when_nothing_is_released_for_its_patience() {
        let budget = Arc::new(Budget::new(10));
        let pressure = Arc::new(Notify::new());
        let held = budget.acquire(10, &pressure, None).await.expect("free");
        let patience = Some(Duration::from_millis(200));
        let waited = budget
            .acquire(5, &pressure, patience)
            .await
            .expect_err("nothing released");
        assert_eq!(waited, Duration::from_millis(200));
        assert_eq!(
            budget.used_and_waiters(),
            (10, 0),
            "gave up without a trace"
        );
        // Each release starts its patience again: a writer waits as long as dirty data
        // leaves, and gets its bytes once they fit.
        let (b, p) = (budget.clone(), pressure.clone());
        let waiter = tokio::spawn(async move { b.acquire(5, &p, patience).await.map(drop) });
        budget.force(10);
        drop(held);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            budget.release(1);
            budget.force(1);
        }
        assert!(
            !waiter.is_finished(),
            "still waiting after twice its patience"
        );
        budget.release(5);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("granted")
            .expect("join")
            .expect("granted within its patience");
    }
}
