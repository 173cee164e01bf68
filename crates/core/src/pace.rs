//! How many uploads run at once: between a floor and a ceiling, adapted to the store's
//! latency as it is measured (`UploadPace`).
//!
//! A far store needs many uploads in flight to be busy (each waits a round trip), a near one
//! few (more only contend for the same disk and cores): the right number depends on the
//! latency, which the user should not have to tune. Like TCP Vegas, the pace compares each
//! upload's duration with the fastest one seen lately. While uploads take little longer than
//! the fastest (the link is not queuing) and jobs wait for a worker, one more upload may
//! run (seven while they take no longer at all, so the limit grows eightfold each round
//! trip, like a slow start); once they take several times longer (the link or the store is
//! saturated and more concurrency only adds waiting) one fewer. A near store thus stays near the floor and a
//! far one climbs towards the ceiling, until its bandwidth is used. An upload the store
//! fails halves the limit (down to the floor), as a loss does TCP's: a throttling store gets
//! fewer requests at once, not as many retries. And the limit stays at what the store takes,
//! at its measured rate, in a quarter of its deadline for one upload: on a slow link, more
//! uploads at once would each take longer, until they time out.
//!
//! Durations are compared within a size class (objects of one power of two of bytes), since
//! a small object is always faster than a large one. The fastest duration of a class is its
//! minimum; it only forgets (creeps up) while the pace is at its floor and uploads are still
//! slow, which is a store that moved farther away, not a saturated one.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Uploads that may always run at once (the fixed number before the pace adapted), for
/// blocks of up to 8 MiB.
pub(crate) const FLOOR: usize = 8;
/// Most bytes of uploads in flight: the ceiling is lowered for large blocks, whose bytes
/// each upload holds in memory.
const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;
/// A duration below this multiple of the fastest lets one more upload run...
const GROW_BELOW: f64 = 1.5;
/// Below this multiple, [`GROW_FAST`] more may run per upload...
const GROW_FAST_BELOW: f64 = 1.2;
/// ... so that the limit grows eightfold each round trip while uploads do not queue at
/// all: from the floor to a ceiling of 64 in one round trip.
const GROW_FAST: usize = 7;
/// ... and one above this multiple stops one.
const SHRINK_ABOVE: f64 = 3.0;
/// The weight of each new duration in the recent average.
const RECENT_WEIGHT: f64 = 0.2;
/// How fast the fastest duration forgets (per slow upload at the floor), so that a store
/// that moved farther away is learned again.
const FASTEST_DRIFT: f64 = 1.01;
/// Size classes: objects of up to 2^0 .. 2^63 bytes.
const CLASSES: usize = 64;
/// Most of the store's deadline that an upload may wait behind the others in flight: the
/// limit stays at most what the store takes in this share of its deadline, so that a slow
/// link is not given uploads that would time out (at 2 MiB/s and the daemon's default 30 s
/// deadline, 15 uploads of 1 MiB). It never goes under the floor.
const DEADLINE_SHARE: f64 = 0.25;

/// A turn to upload ([`UploadPace::turn`]), given back through the pace.
#[derive(Debug)]
pub(crate) struct Turn {
    permit: OwnedSemaphorePermit,
    /// Uploads in flight as this one started, itself included.
    in_flight: usize,
}

/// The upload workers' permits and the measure that sizes them.
#[derive(Debug)]
pub(crate) struct UploadPace {
    permits: Arc<Semaphore>,
    floor: usize,
    ceiling: usize,
    /// The block size: the size of the objects whose uploads measure the store's rate.
    block_size: u64,
    /// The store's deadline for one upload, if the limit must keep uploads well within it.
    deadline: Option<f64>,
    measure: Mutex<Measure>,
}

#[derive(Debug)]
struct Measure {
    /// Uploads allowed at once: the permits handed out and available.
    limit: usize,
    /// The fastest upload of each size class (seconds).
    fastest: [Option<f64>; CLASSES],
    /// The average of recent uploads' durations, each over its class's fastest.
    recent: Option<f64>,
    /// Turns in use that are not given back when they come back, since the limit was cut
    /// below the permits handed out ([`UploadPace::failed`]).
    owed: usize,
    /// Uploads that were in flight at the last cut and have not come back: their failures
    /// are the same loss as the one that cut, and cut nothing more.
    in_flight_at_cut: usize,
    /// The limit grows fast ([`GROW_FAST`]) only below this: the ceiling until a failure cut
    /// the limit, then the limit that cut left (TCP's slow-start threshold).
    grow_fast_until: usize,
    /// The bytes a second the store takes, as recent block-sized uploads tell (Little's
    /// law: the uploads in flight as one started, times its bytes, over how long it took).
    rate: Option<f64>,
}

impl UploadPace {
    /// A pace between [`FLOOR`] and `upload_tasks`, starting at the floor. Both stay within
    /// [`MAX_BYTES_IN_FLIGHT`] of `block_size` blocks: blocks over 8 MiB lower the floor too,
    /// down to one upload at a time.
    pub(crate) fn new(upload_tasks: usize, block_size: u64) -> Self {
        let by_memory =
            usize::try_from(MAX_BYTES_IN_FLIGHT / block_size.max(1)).unwrap_or(usize::MAX);
        // Large blocks lower the floor too: each upload holds its block in memory.
        let ceiling = upload_tasks.min(by_memory).max(1);
        let floor = FLOOR.min(ceiling);
        Self {
            permits: Arc::new(Semaphore::new(floor)),
            floor,
            ceiling,
            block_size: block_size.max(1),
            deadline: None,
            measure: Mutex::new(Measure {
                limit: floor,
                fastest: [None; CLASSES],
                recent: None,
                owed: 0,
                in_flight_at_cut: 0,
                grow_fast_until: ceiling,
                rate: None,
            }),
        }
    }

    /// Keeps the limit at what the store takes in a quarter of `deadline`, the most an
    /// upload may take, as its rate is measured: more uploads at once on a slow link would
    /// only wait behind each other until they time out.
    pub(crate) fn with_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.deadline = Some(deadline.as_secs_f64());
        self
    }

    /// The most uploads that may ever run at once: the number of workers to start.
    pub(crate) fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The uploads that may always run at once.
    pub(crate) fn floor(&self) -> usize {
        self.floor
    }

    /// Uploads allowed at once now.
    pub(crate) fn limit(&self) -> usize {
        self.measure.lock().expect("pace poisoned").limit
    }

    /// Waits for a turn to upload. Cancel-safe.
    pub(crate) async fn turn(&self) -> Turn {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the pace's semaphore is never closed");
        let m = self.measure.lock().expect("pace poisoned");
        let in_flight = (m.limit + m.owed).saturating_sub(self.permits.available_permits());
        Turn {
            permit,
            in_flight: in_flight.max(1),
        }
    }

    /// Records an upload of `len` bytes that took `secs`, while other jobs were waiting
    /// (`backlog`) or not, and gives its turn back, or keeps it when the limit goes down.
    pub(crate) fn done(&self, turn: Turn, len: u64, secs: f64, backlog: bool) {
        let secs = secs.max(1e-6);
        let class = (u64::BITS - len.leading_zeros()) as usize % CLASSES;
        let mut m = self.measure.lock().expect("pace poisoned");
        let fastest = m.fastest[class].map_or(secs, |f| f.min(secs));
        let ratio = secs / fastest;
        let recent = m.recent.map_or(ratio, |r| r + RECENT_WEIGHT * (ratio - r));
        m.recent = Some(recent);
        m.fastest[class] = Some(if m.limit == self.floor && recent > SHRINK_ABOVE {
            // Slow even at the floor: the store is farther than it was.
            (fastest * FASTEST_DRIFT).min(secs)
        } else {
            fastest
        });
        if len * 2 >= self.block_size {
            // Counted as the upload started: uploads that ran side by side and end together
            // would otherwise count the turns their own ends added.
            let rate = turn.in_flight as f64 * len as f64 / secs;
            m.rate = Some(m.rate.map_or(rate, |r| r + RECENT_WEIGHT * (rate - r)));
        }
        // The most uploads the store's rate lets finish within a share of its deadline.
        let by_deadline = match (self.deadline, m.rate) {
            (Some(deadline), Some(rate)) => ((rate * deadline * DEADLINE_SHARE
                / self.block_size as f64) as usize)
                .clamp(self.floor, self.ceiling),
            _ => self.ceiling,
        };
        let mut grow = 0;
        let slow = recent > SHRINK_ABOVE || m.limit > by_deadline;
        if m.owed > 0 || !slow || m.limit == self.floor {
            if m.owed == 0 && recent < GROW_BELOW && backlog && m.limit < by_deadline {
                // Faster while uploads take no longer than the fastest at all: the limit
                // then grows eightfold each round trip instead of doubling.
                grow = if recent < GROW_FAST_BELOW && m.limit < m.grow_fast_until {
                    GROW_FAST
                } else {
                    1
                };
                grow = grow.min(by_deadline - m.limit);
                m.limit += grow;
            }
            self.give_back_locked(&mut m, turn);
        } else {
            m.limit -= 1;
            m.in_flight_at_cut = m.in_flight_at_cut.saturating_sub(1);
            // This turn is not given back: one fewer upload runs.
            turn.permit.forget();
        }
        drop(m);
        if grow > 0 {
            self.permits.add_permits(grow);
        }
    }

    /// Records an upload that the store failed (an error, a timeout, a refusal to take more):
    /// the limit halves, down to the floor, as TCP's does on a loss, once for the uploads
    /// that were in flight together (they fail together when a store throttles). An
    /// overloaded or throttling store (S3's 503 Slow Down) then gets fewer requests at once
    /// instead of as many retries; the limit grows again as uploads succeed quickly, by one
    /// per upload above the limit the cut left.
    pub(crate) fn failed(&self, turn: Turn) {
        let mut m = self.measure.lock().expect("pace poisoned");
        let cut = m.limit - (m.limit / 2).max(self.floor);
        if m.in_flight_at_cut > 0 || cut == 0 {
            self.give_back_locked(&mut m, turn);
            return;
        }
        // The turns handed out now, this one included: the uploads of this loss.
        let handed_out = (m.limit + m.owed).saturating_sub(self.permits.available_permits());
        m.limit -= cut;
        m.grow_fast_until = m.limit;
        m.in_flight_at_cut = handed_out.saturating_sub(1);
        turn.permit.forget();
        // The rest of the cut: turns free now, then turns in use as they come back.
        let free = self.permits.forget_permits(cut - 1);
        m.owed += cut - 1 - free;
    }

    /// Gives back the turn of an upload that says nothing of the store (the cache's own
    /// failure, as an unreadable cache file).
    pub(crate) fn give_back(&self, turn: Turn) {
        let mut m = self.measure.lock().expect("pace poisoned");
        self.give_back_locked(&mut m, turn);
    }

    /// A turn comes back: it is kept if a cut still takes turns back, else it is free again.
    fn give_back_locked(&self, m: &mut Measure, turn: Turn) {
        m.in_flight_at_cut = m.in_flight_at_cut.saturating_sub(1);
        if m.owed > 0 {
            m.owed -= 1;
            turn.permit.forget();
        } else {
            drop(turn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn upload(pace: &UploadPace, secs: f64, backlog: bool) {
        let turn = pace.turn().await;
        pace.done(turn, 1 << 20, secs, backlog);
    }

    /// A pace that climbed to its ceiling of 64, with every turn taken.
    async fn at_the_ceiling_every_turn_in_use() -> (UploadPace, Vec<Turn>) {
        let pace = UploadPace::new(64, 1 << 20);
        for _ in 0..FLOOR {
            upload(&pace, 0.1, true).await;
        }
        assert_eq!(pace.limit(), 64);
        let mut turns = Vec::new();
        for _ in 0..64 {
            turns.push(pace.turn().await);
        }
        (pace, turns)
    }

    /// A link that carries `per_sec` uploads a second after a round trip of `rtt`: with
    /// `limit` uploads in flight, each takes the longer of the round trip and the time the
    /// link needs for all of them. Returns the limit after `n` uploads, and one in ten is a
    /// small object (a file's tail) when `tails`.
    async fn simulate(pace: &UploadPace, rtt: f64, per_sec: f64, n: usize, tails: bool) -> usize {
        for i in 0..n {
            let limit = pace.limit() as f64;
            let turn = pace.turn().await;
            let (len, secs) = if tails && i % 10 == 0 {
                (4 << 10, rtt)
            } else {
                (1 << 20, rtt.max(limit / per_sec))
            };
            pace.done(turn, len, secs, true);
        }
        pace.limit()
    }

    #[tokio::test]
    async fn a_saturated_link_keeps_the_pace_near_its_bandwidth_delay_product() {
        // 100 uploads a second at 0.1 s: 10 in flight fill it.
        let pace = UploadPace::new(64, 1 << 20);
        let limit = simulate(&pace, 0.1, 100.0, 5000, false).await;
        assert!((10..=30).contains(&limit), "limit {limit}");
        // A latency-bound far store with small tails among its objects climbs to the top.
        let pace = UploadPace::new(64, 1 << 20);
        assert_eq!(simulate(&pace, 0.1, 1e6, 2000, true).await, 64);
    }

    #[tokio::test]
    async fn a_far_store_climbs_to_the_ceiling_and_a_saturated_one_falls_back() {
        let pace = UploadPace::new(64, 1 << 20);
        assert_eq!((pace.limit(), pace.ceiling()), (FLOOR, 64));
        // Uploads that all take one round trip, with jobs waiting: one more each time.
        for _ in 0..100 {
            upload(&pace, 0.1, true).await;
        }
        assert_eq!(pace.limit(), 64);
        assert_eq!(pace.permits.available_permits(), 64);
        // Saturated: each upload takes much longer than the fastest.
        for _ in 0..100 {
            upload(&pace, 0.5, true).await;
        }
        assert!(pace.limit() < 64, "limit {}", pace.limit());
        assert_eq!(pace.permits.available_permits(), pace.limit());
    }

    #[tokio::test]
    async fn a_slow_link_gets_no_more_uploads_than_finish_well_within_the_deadline() {
        // 1 MiB a second, a 60 s deadline: 15 uploads of 1 MiB take 15 s, a quarter of it.
        /// The most uploads `pace` lets run at once on a link of one upload a second.
        async fn most_on_a_slow_link(pace: &UploadPace) -> usize {
            let mut most = 0;
            for _ in 0..500 {
                let limit = pace.limit();
                most = most.max(limit);
                let turn = pace.turn().await;
                pace.done(turn, 1 << 20, 0.1f64.max(limit as f64), true);
            }
            most
        }
        let deadline = std::time::Duration::from_secs(60);
        let most = most_on_a_slow_link(&UploadPace::new(64, 1 << 20).with_deadline(deadline)).await;
        assert!(most <= 16, "up to {most} uploads of 15 s or more");
        // The same link without a deadline to keep: the fast start overshoots.
        let most = most_on_a_slow_link(&UploadPace::new(64, 1 << 20)).await;
        assert!(most > 16, "{most}");
        // A far store's rate is high: the deadline holds nothing back.
        let pace = UploadPace::new(64, 1 << 20).with_deadline(deadline);
        for _ in 0..FLOOR {
            upload(&pace, 0.1, true).await;
        }
        assert_eq!(pace.limit(), 64);
    }

    #[tokio::test]
    async fn uploads_that_ran_together_do_not_count_the_turns_their_own_ends_added() {
        // The floor's uploads share a 1 MiB/s link: 8 s each. Within a quarter of a 60 s
        // deadline, 15 such uploads fit.
        let pace = UploadPace::new(64, 1 << 20).with_deadline(std::time::Duration::from_secs(60));
        let mut turns = Vec::new();
        for _ in 0..FLOOR {
            turns.push(pace.turn().await);
        }
        for turn in turns {
            pace.done(turn, 1 << 20, 8.0, true);
        }
        assert!(pace.limit() <= 16, "limit {}", pace.limit());
    }

    #[tokio::test]
    async fn an_idle_far_store_is_filled_within_one_round_trip() {
        // The floor's uploads, all as fast as the fastest: the next round trip has the
        // ceiling in flight.
        let pace = UploadPace::new(64, 1 << 20);
        for _ in 0..FLOOR {
            upload(&pace, 0.1, true).await;
        }
        assert_eq!(pace.limit(), 64);
    }

    #[tokio::test]
    async fn a_failure_halves_the_limit_even_with_every_turn_in_use() {
        let (pace, mut turns) = at_the_ceiling_every_turn_in_use().await;
        pace.failed(turns.pop().expect("a turn"));
        assert_eq!(pace.limit(), 32);
        for turn in turns {
            pace.done(turn, 1 << 20, 0.1, false);
        }
        assert_eq!(pace.permits.available_permits(), 32);
        // A turn free when the next fails: 16; at the floor, failures change nothing.
        pace.failed(pace.turn().await);
        assert_eq!((pace.limit(), pace.permits.available_permits()), (16, 16));
        for _ in 0..3 {
            pace.failed(pace.turn().await);
        }
        assert_eq!(
            (pace.limit(), pace.permits.available_permits()),
            (FLOOR, FLOOR)
        );
        // Quick uploads that find jobs waiting grow it again, by one each above the limit a
        // cut left.
        upload(&pace, 0.1, true).await;
        assert_eq!(pace.limit(), FLOOR + 1);
    }

    #[tokio::test]
    async fn uploads_failing_together_cut_once_and_then_run_no_more_than_the_limit() {
        // A throttling store fails every upload in flight at once (S3's 503 Slow Down).
        let (pace, turns) = at_the_ceiling_every_turn_in_use().await;
        for turn in turns {
            pace.failed(turn);
        }
        assert_eq!(pace.limit(), 32, "one loss, one cut");
        assert_eq!(
            pace.permits.available_permits(),
            32,
            "as many turns as the limit"
        );
        // The next failure is a new loss.
        pace.failed(pace.turn().await);
        assert_eq!((pace.limit(), pace.permits.available_permits()), (16, 16));
    }

    #[tokio::test]
    async fn a_turn_given_back_without_a_measure_still_pays_what_a_cut_took() {
        let (pace, mut turns) = at_the_ceiling_every_turn_in_use().await;
        pace.failed(turns.pop().expect("a turn"));
        assert_eq!(pace.limit(), 32);
        // The worker's answer to a failure that is not the store's (an unreadable file).
        for turn in turns {
            pace.give_back(turn);
        }
        assert_eq!(pace.permits.available_permits(), 32);
    }

    #[tokio::test]
    async fn no_backlog_no_growth_and_large_blocks_lower_the_ceiling() {
        let pace = UploadPace::new(64, 1 << 20);
        for _ in 0..50 {
            upload(&pace, 0.1, false).await;
        }
        assert_eq!(pace.limit(), FLOOR);
        assert_eq!(UploadPace::new(64, 4 << 20).ceiling(), 16);
        // At most 64 MiB of blocks in flight, even under the floor.
        let large = UploadPace::new(64, 16 << 20);
        assert_eq!((large.floor(), large.ceiling()), (4, 4));
        let huge = UploadPace::new(64, 1 << 30);
        assert_eq!((huge.floor(), huge.ceiling(), huge.limit()), (1, 1, 1));
        assert_eq!(UploadPace::new(2, 1 << 20).ceiling(), 2);
        assert_eq!(UploadPace::new(2, 1 << 20).limit(), 2);
    }
}
