//! Every metric the daemon exports, described once: its help text and unit (the `# HELP`
//! and `# TYPE` lines of `/metrics`), and the ones sampled when `/metrics` is scraped: the
//! build, the process (through `metrics-process`), and the engine's usage.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Gauges set from the engine's usage at every scrape: name, unit, help.
pub const USAGE_GAUGES: &[(&str, Unit, &str)] = &[
    (
        "blockcache_metadata_generation",
        Unit::Count,
        "Generation of the volume's metadata in the store.",
    ),
    (
        "blockcache_metadata_pending_changes",
        Unit::Count,
        "Metadata changes not yet shipped to the store.",
    ),
    (
        "blockcache_metadata_lag_seconds",
        Unit::Seconds,
        "Age of the oldest metadata change not yet shipped.",
    ),
    (
        "blockcache_cache_bytes",
        Unit::Bytes,
        "Bytes of the cached blocks.",
    ),
    ("blockcache_cache_entries", Unit::Count, "Cached blocks."),
    (
        "blockcache_cache_max_bytes",
        Unit::Bytes,
        "The cache's size limit (--max-cache-size).",
    ),
    (
        "blockcache_cache_max_entries",
        Unit::Count,
        "The cache's block limit (--max-entries).",
    ),
    (
        "blockcache_dirty_bytes",
        Unit::Bytes,
        "Bytes of the blocks not yet in the store.",
    ),
    (
        "blockcache_dirty_entries",
        Unit::Count,
        "Blocks not yet in the store.",
    ),
    (
        "blockcache_dirty_max_bytes",
        Unit::Bytes,
        "The dirty budget (--max-dirty): writers wait beyond it.",
    ),
    (
        "blockcache_oldest_dirty_age_seconds",
        Unit::Seconds,
        "Time since the oldest dirty block became dirty.",
    ),
    (
        "blockcache_uploads_in_flight",
        Unit::Count,
        "Uploads running now.",
    ),
    (
        "blockcache_upload_concurrency",
        Unit::Count,
        "Uploads allowed at once, as adapted to the store's latency (between 8 and --upload-tasks; halved when the store fails an upload).",
    ),
    (
        "blockcache_pending_removals",
        Unit::Count,
        "Objects waiting to be deleted from the store.",
    ),
    (
        "blockcache_http_buffers",
        Unit::Count,
        "Block buffers for requests (--buffer-memory).",
    ),
    (
        "blockcache_http_buffers_free",
        Unit::Count,
        "Block buffers for requests free now.",
    ),
    (
        "blockcache_store_logical_bytes",
        Unit::Bytes,
        "Bytes of every mapped block, counting duplicates.",
    ),
    (
        "blockcache_store_unique_bytes",
        Unit::Bytes,
        "Bytes of the distinct objects, before compression.",
    ),
    (
        "blockcache_store_stored_bytes",
        Unit::Bytes,
        "Bytes the objects take in the store.",
    ),
    (
        "blockcache_store_up",
        Unit::Count,
        "1 while the object store answers, 0 during an outage.",
    ),
    (
        "blockcache_lease_epoch",
        Unit::Count,
        "Epoch of the volume's writer lease this daemon holds.",
    ),
    (
        "blockcache_lease_writing",
        Unit::Count,
        "1 while this daemon's lease lets it write to the store.",
    ),
];

/// Counters set from the engine's usage at every scrape: name, unit, help.
pub const USAGE_COUNTERS: &[(&str, Unit, &str)] = &[
    (
        "blockcache_cache_hits_total",
        Unit::Count,
        "Block reads served from the cache.",
    ),
    (
        "blockcache_cache_misses_total",
        Unit::Count,
        "Block reads that had to download.",
    ),
    ("blockcache_uploads_total", Unit::Count, "Objects uploaded."),
    (
        "blockcache_upload_bytes_total",
        Unit::Bytes,
        "Bytes uploaded.",
    ),
    (
        "blockcache_upload_errors_total",
        Unit::Count,
        "Uploads that failed (after retries).",
    ),
    (
        "blockcache_downloads_total",
        Unit::Count,
        "Objects downloaded.",
    ),
    (
        "blockcache_download_bytes_total",
        Unit::Bytes,
        "Bytes downloaded.",
    ),
    (
        "blockcache_download_errors_total",
        Unit::Count,
        "Downloads that failed (after retries).",
    ),
    (
        "blockcache_dedup_hits_total",
        Unit::Count,
        "Blocks whose content the volume already held.",
    ),
    (
        "blockcache_download_dedup_hits_total",
        Unit::Count,
        "Misses served by sharing the cached file of another block with the same object, without a download.",
    ),
    (
        "blockcache_prefetches_total",
        Unit::Count,
        "Blocks that readahead started loading in the background.",
    ),
    (
        "blockcache_deletes_total",
        Unit::Count,
        "Objects deleted from the store.",
    ),
    (
        "blockcache_delete_errors_total",
        Unit::Count,
        "Deletions that failed (after retries).",
    ),
    (
        "blockcache_metadata_objects_written_total",
        Unit::Count,
        "Metadata objects written to the store.",
    ),
    (
        "blockcache_metadata_written_bytes_total",
        Unit::Bytes,
        "Bytes of metadata written to the store.",
    ),
];

/// Describes every metric; once, after the recorder is installed.
pub fn describe(process: &metrics_process::Collector) {
    for &(name, unit, help) in USAGE_GAUGES {
        describe_gauge!(name, unit, help);
    }
    for &(name, unit, help) in USAGE_COUNTERS {
        describe_counter!(name, unit, help);
    }
    describe_gauge!(
        "blockcache_build_info",
        "Always 1; labelled with the daemon's version."
    );
    describe_counter!(
        "blockcache_http_requests_total",
        Unit::Count,
        "File API requests, by route, method and status."
    );
    describe_histogram!(
        "blockcache_http_request_duration_seconds",
        Unit::Seconds,
        "Time of file API requests to their answer's head, by route, method and status class."
    );
    describe_counter!(
        "blockcache_s3_requests_total",
        Unit::Count,
        "S3 requests, by operation and answer code (OK or the S3 error code)."
    );
    describe_histogram!(
        "blockcache_s3_request_duration_seconds",
        Unit::Seconds,
        "Time of S3 requests to their answer's head, by operation."
    );
    describe_histogram!(
        "blockcache_upload_duration_seconds",
        Unit::Seconds,
        "Time of object uploads (retries included), by outcome."
    );
    describe_histogram!(
        "blockcache_download_duration_seconds",
        Unit::Seconds,
        "Time of object downloads (retries included), by outcome."
    );
    describe_histogram!(
        "blockcache_delete_duration_seconds",
        Unit::Seconds,
        "Time of batched object deletions, by outcome."
    );
    process.describe();
    metrics::gauge!("blockcache_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}
