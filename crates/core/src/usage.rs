//! What the cache holds and has done, as one snapshot.

use std::time::Duration;

use crate::Limits;

/// A snapshot of the cache's usage and counters. Computing it is O(1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Cached blocks.
    pub entries: u64,
    /// Cached bytes.
    pub bytes: u64,
    /// Dirty blocks.
    pub dirty_entries: u64,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Uploads handed to the upload tasks and not yet recorded.
    pub uploads_in_flight: u64,
    /// Store objects waiting to be deleted.
    pub pending_removals: u64,
    /// How long the oldest dirty block has been dirty.
    pub oldest_dirty_age: Option<Duration>,
    /// Bytes confirmed in the store.
    pub stored_bytes: u64,
    /// Sum of the lengths of distinct objects.
    pub unique_bytes: u64,
    /// Sum of the lengths of all mapped blocks.
    pub logical_bytes: u64,
    /// Bytes saved by deduplication (`logical_bytes - unique_bytes`).
    pub dedup_savings: u64,
    /// Current limits.
    pub limits: Limits,
    /// Reads and writes served from a cached block.
    pub hits: u64,
    /// Accesses that downloaded a block.
    pub misses: u64,
    /// Uploads recorded.
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
    /// Uploads that failed after retries.
    pub upload_errors: u64,
    /// Downloads.
    pub downloads: u64,
    /// Bytes downloaded.
    pub download_bytes: u64,
    /// Misses served without a download: the block's object was already cached for another
    /// block, whose file the missing block now shares (a hard link).
    pub download_dedup_hits: u64,
    /// Blocks that readahead started loading in the background (each is a miss, counted in
    /// `misses` and `downloads` too when it downloads).
    pub prefetches: u64,
    /// Uploads allowed at once now: the upload pace, between 8 and `upload_tasks`, which
    /// grows while uploads are quick and halves when the store fails one.
    pub upload_concurrency: u64,
    /// Downloads that failed or returned corrupted data.
    pub download_errors: u64,
    /// Commits that deduplicated against an existing object.
    pub dedup_hits: u64,
    /// Store objects deleted.
    pub deletes: u64,
    /// Bulk deletions that failed (and were retried).
    pub delete_errors: u64,
    /// Whether the store answered the last operation that reached it
    /// ([`blockcache_backend::Backend::is_up`]).
    pub store_up: bool,
}
