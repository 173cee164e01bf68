//! The dirty-bytes budget: writers wait here, before they lock a block, while dirty data is
//! over its limit. Nothing dirty is ever dropped to make room.
//!
//! A semaphore cannot change its size at runtime, so this is a counter with a limit behind a
//! std mutex (never held across an await) and a `Notify` for waiters.

use std::sync::Mutex;

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
    /// limit is granted once nothing else is in use, so it cannot wait forever.
    pub(crate) async fn acquire(&self, n: u64, pressure: &Notify) {
        let mut registered = false;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut c = self.counts.lock().expect("budget mutex poisoned");
                if c.used + n <= c.limit || c.used == 0 {
                    c.used += n;
                    if registered {
                        c.waiters -= 1;
                    }
                    return;
                }
                if !registered {
                    c.waiters += 1;
                    registered = true;
                }
            }
            pressure.notify_one();
            freed.await;
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

    /// Bytes in use (dirty data plus what open write handles reserved).
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.counts.lock().expect("budget mutex poisoned").used
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waits_until_released_and_signals_pressure() {
        let budget = Arc::new(Budget::new(10));
        let pressure = Arc::new(Notify::new());
        budget.acquire(8, &pressure).await;
        let (b, p) = (budget.clone(), pressure.clone());
        let waiter = tokio::spawn(async move { b.acquire(5, &p).await });
        pressure.notified().await;
        assert!(budget.under_pressure());
        assert!(!waiter.is_finished());
        budget.release(8);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("granted after release")
            .expect("join");
        assert_eq!(budget.used(), 5);
        assert!(!budget.under_pressure());
    }

    #[tokio::test]
    async fn oversized_request_is_granted_when_idle_and_limit_can_grow() {
        let budget = Budget::new(4);
        let pressure = Notify::new();
        budget.acquire(100, &pressure).await;
        assert_eq!(budget.used(), 100);
        budget.release(100);
        budget.set_limit(1000);
        budget.acquire(600, &pressure).await;
        budget.acquire(400, &pressure).await;
        assert_eq!(budget.used(), 1000);
    }
}
