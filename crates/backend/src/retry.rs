//! The one retry layer of store operations: whole operations retried with exponential
//! backoff and jitter, within an overall deadline.
//!
//! object_store's HTTP clients do not retry on their own (the backend builds them with
//! `max_retries: 0`), so an operation makes at most `max_attempts` requests and ends within
//! `deadline`, whatever fails.

use std::time::Duration;

use rand::RngExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::health::Health;

/// How often and how patiently a failed store operation is retried.
///
/// Only errors for which [`Error::is_transient`] is true are retried. This policy wraps whole
/// operations (including draining a response body) and is the only retry layer.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
    /// Attempts logged at DEBUG before one line at INFO says the operation keeps failing.
    pub warn_after: u32,
    /// The longest an operation takes, its retries and their delays included: an attempt
    /// still running then is abandoned and the operation fails with [`Error::TimedOut`].
    pub deadline: Duration,
    /// Once an operation has failed on transient errors, the store counts as down and
    /// operations fail at once ([`Error::Unavailable`]) for this long after each failure,
    /// then try again. Zero: every operation tries the store.
    pub probe_interval: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            warn_after: 3,
            deadline: Duration::from_secs(30),
            probe_interval: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before retry number `retry` (0-based), with up to 50 % random jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let base = self
            .initial_delay
            .saturating_mul(2u32.saturating_pow(retry.min(20)))
            .min(self.max_delay);
        let jitter = rand::rng().random_range(1.0..1.5);
        base.mul_f64(jitter).min(self.max_delay)
    }

    /// Runs `op` until it succeeds, fails permanently, runs out of attempts or time, or
    /// `cancel` fires (between attempts). `op` must be safe to drop at an await (it is, when
    /// the deadline passes): store requests of never-reused keys are.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        health: &Health,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        health.admit()?;
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut attempt = 0;
        let mut last: Option<Error> = None;
        let error = loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            // Shutdown does not abandon an attempt (it is checked between attempts): the
            // engine's tasks, and so its directory lock, outlive the requests they made. The
            // deadline does: `op` may be dropped.
            let outcome = tokio::select! {
                () = tokio::time::sleep_until(deadline) => None,
                result = op() => Some(result),
            };
            attempt += 1;
            let error = match outcome {
                Some(Ok(value)) => {
                    health.answered();
                    return Ok(value);
                }
                Some(Err(error)) => error,
                None => {
                    break Error::TimedOut {
                        what: what.to_owned(),
                        after: started.elapsed(),
                        attempts: attempt,
                        source: last.map(Box::new),
                    };
                }
            };
            if matches!(error, Error::Fenced { .. }) {
                // Not this request's failure: the lease decides when writes resume.
                return Err(error);
            }
            if !error.is_transient() {
                if error.refuses_everything() {
                    // No bucket, or no access: nothing will get through until that changes,
                    // which is an outage too (logged once, not once per object).
                    health.failed(&error, self.probe_interval);
                } else if error.is_answer() {
                    health.answered();
                }
                return Err(error);
            }
            let delay = self.delay(attempt - 1);
            if attempt >= self.max_attempts.max(1) || Instant::now() + delay >= deadline {
                break error;
            }
            if attempt == self.warn_after && health.is_up() {
                tracing::info!(error = %crate::chain(&error), attempt, "{what} keeps failing; retrying for up to {:?}", self.deadline);
            } else {
                tracing::debug!(error = %crate::chain(&error), attempt, "{what} failed; retrying");
            }
            health.attempt_failed(&error);
            last = Some(error);
            tokio::select! {
                () = cancel.cancelled() => return Err(Error::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
        };
        health.failed(&error, self.probe_interval);
        Err(error)
    }
}
