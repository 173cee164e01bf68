//! Whether the store answers: the state every operation of one [`crate::Backend`] (and its
//! clones) shares, the one place that logs an outage and its end, and the fail-fast rule
//! while the store is down.
//!
//! An operation whose retries ran out on transient errors, or that the store refused as a
//! whole (no bucket, access denied), marks the store down; any other answer from the store
//! (a success, or "no such object") marks it up. The first
//! transition to down is logged once with its cause, at most once a minute, and the return
//! once. While the store is down, operations fail at once with
//! [`crate::Error::Unavailable`] (naming the cause) until `probe_interval` has passed since
//! the last failure; then they try the store again. [`Health::retry_now`] lets the next
//! operations try at once (a flush asked for by a user does).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::Error;

/// Down transitions closer together than this are logged at DEBUG, not ERROR.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// The shared health of one store.
#[derive(Debug, Clone, Default)]
pub(crate) struct Health(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    down: Option<Down>,
    /// The last failed attempt of an operation still retrying, until the store answers.
    failing: Option<String>,
    /// When an outage was last logged.
    last_report: Option<Instant>,
}

#[derive(Debug)]
struct Down {
    since: Instant,
    /// The last failure, with its causes.
    cause: String,
    /// Operations fail at once before this.
    retry_at: Instant,
    /// Whether the start of this outage was logged (then its end is too).
    reported: bool,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("store health mutex poisoned")
    }

    /// Whether the store answered the last operation that reached it.
    pub(crate) fn is_up(&self) -> bool {
        self.lock().down.is_none()
    }

    /// The failure that made the store count as down, with its causes.
    pub(crate) fn cause(&self) -> Option<String> {
        self.lock().down.as_ref().map(|d| d.cause.clone())
    }

    /// [`Health::cause`], or while the store still counts as up, the failure of an attempt
    /// since it last answered (an operation retrying it has not given up yet).
    pub(crate) fn failing_cause(&self) -> Option<String> {
        let st = self.lock();
        st.down
            .as_ref()
            .map(|d| d.cause.clone())
            .or_else(|| st.failing.clone())
    }

    /// An attempt failed and its operation retries.
    pub(crate) fn attempt_failed(&self, error: &Error) {
        self.lock().failing = Some(crate::chain(error));
    }

    /// Whether an operation would try the store now (it is up, or a retry is due).
    pub(crate) fn is_available(&self) -> bool {
        self.lock()
            .down
            .as_ref()
            .is_none_or(|d| Instant::now() >= d.retry_at)
    }

    /// Lets the next operations try the store at once.
    pub(crate) fn retry_now(&self) {
        if let Some(d) = self.lock().down.as_mut() {
            d.retry_at = Instant::now();
        }
    }

    /// `Ok` if an operation may try the store; while it is down and no retry is due, the
    /// error to fail with at once.
    pub(crate) fn admit(&self) -> Result<(), Error> {
        let st = self.lock();
        match &st.down {
            Some(d) if Instant::now() < d.retry_at => Err(Error::Unavailable {
                down_for: d.since.elapsed(),
                cause: d.cause.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The store answered.
    pub(crate) fn answered(&self) {
        let ended = {
            let mut st = self.lock();
            st.failing = None;
            st.down.take()
        };
        if let Some(d) = ended {
            let down_for = d.since.elapsed();
            if d.reported {
                tracing::info!(
                    down_for = ?down_for,
                    "object store reachable again after {down_for:.1?}; uploads resume"
                );
            } else {
                tracing::debug!(down_for = ?down_for, "object store reachable again");
            }
        }
    }

    /// An operation ran out of retries on transient errors: the store counts as down, and
    /// operations fail at once for `probe_interval`.
    pub(crate) fn failed(&self, error: &Error, probe_interval: Duration) {
        let now = Instant::now();
        let cause = crate::chain(error);
        let report = {
            let mut st = self.lock();
            let State {
                down, last_report, ..
            } = &mut *st;
            let due = last_report.is_none_or(|t| now.duration_since(t) >= REPORT_INTERVAL);
            let d = down.get_or_insert_with(|| Down {
                since: now,
                cause: String::new(),
                retry_at: now,
                reported: false,
            });
            d.cause.clone_from(&cause);
            d.retry_at = now + probe_interval;
            // An outage that started too soon after the last one was logged is logged once
            // it has lasted a while.
            let report = !d.reported && due;
            if report {
                d.reported = true;
                *last_report = Some(now);
            }
            report
        };
        if report {
            tracing::error!(
                "object store unreachable: {cause}; writes stay dirty in the cache and are uploaded once it answers"
            );
        }
    }
}
