//! Retries of whole store operations with exponential backoff and jitter.

use std::time::Duration;

use rand::RngExt;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// How often and how patiently a failed store operation is retried.
///
/// Only errors for which [`Error::is_transient`] is true are retried. object_store retries
/// single HTTP requests on its own; this policy wraps whole operations (including draining a
/// response body).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of any single delay.
    pub max_delay: Duration,
    /// Retries logged at INFO before they are logged at WARN.
    pub warn_after: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            warn_after: 3,
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

    /// Runs `op` until it succeeds, fails permanently, runs out of attempts, or `cancel` fires.
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        mut op: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempt = 0;
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let error = match op().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            attempt += 1;
            if !error.is_transient() || attempt >= self.max_attempts.max(1) {
                return Err(error);
            }
            if attempt <= self.warn_after {
                tracing::info!(error = %error, attempt, "{what} failed, retrying");
            } else {
                tracing::warn!(error = %error, attempt, "{what} still failing, retrying");
            }
            // Both branches are cancel-safe: a sleep and a token.
            tokio::select! {
                () = cancel.cancelled() => return Err(Error::Cancelled),
                () = tokio::time::sleep(self.delay(attempt - 1)) => {}
            }
        }
    }
}
