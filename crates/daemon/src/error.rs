//! Why `blockcache serve` could not start or stopped badly, one variant per part that
//! failed, each keeping the error it got; and how an error is told with its causes.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A failure of `blockcache serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The settings do not fit together.
    #[error("{0}")]
    Settings(String),
    /// The shutdown deadline passed; the dirty data stays in the cache directory.
    #[error(
        "shutdown deadline of {timeout} passed while waiting for {waiting_for}: exiting with {blocks} dirty blocks ({bytes} bytes) left in the cache directory for the next start to upload"
    )]
    Deadline {
        /// The deadline (`--shutdown-timeout`).
        timeout: crate::settings::Timeout,
        /// What the shutdown was still waiting for.
        waiting_for: String,
        /// Dirty blocks left.
        blocks: u64,
        /// Dirty bytes left.
        bytes: u64,
    },
    /// The log subscriber could not be installed.
    #[error("cannot set up logging")]
    Logging(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A non-loopback address without a token, and no `--insecure`.
    #[error(
        "refusing to listen on {addr} (not a loopback address) without an auth token; set --auth-token, or pass --insecure to allow it"
    )]
    Exposed {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// An S3 endpoint on a non-loopback address without keys, and no `--insecure`.
    #[error(
        "refusing to serve S3 on {addr} (not a loopback address) without keys; set --s3-access-key and --s3-secret-key (or --s3-credentials-file), pass --s3-listen off, or pass --insecure to allow it"
    )]
    S3Exposed {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The S3 listening socket could not be opened.
    #[error("cannot serve S3 on {addr}")]
    S3Listener {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data directory could not be resolved or created.
    #[error("cannot use data directory {}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Prometheus recorder could not be installed.
    #[error("cannot set up metrics")]
    Metrics(#[source] metrics_exporter_prometheus::BuildError),
    /// The metadata database could not be opened.
    #[error("cannot open database {url}")]
    Database {
        /// The database URL, credentials hidden.
        url: String,
        /// Why.
        #[source]
        source: blockcache_db::Error,
    },
    /// The object store URL could not be used.
    #[error("cannot use store {url}")]
    Store {
        /// The store URL, credentials hidden.
        url: String,
        /// Why (boxed: object_store's errors are large).
        #[source]
        source: Box<blockcache_backend::Error>,
    },
    /// The engine could not open the cache (directory, recovery, settings).
    #[error("cannot open the cache")]
    Cache(#[source] blockcache::Error),
    /// The file namespace could not be opened over the cache.
    #[error("cannot open the file namespace")]
    Namespace(#[source] blockcache::Error),
    /// The listening socket could not be bound or read.
    #[error("cannot listen on {addr}")]
    Listener {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A request handler still holds the server state after every connection closed.
    #[error("the server state is still shared after every connection closed")]
    StillShared,
    /// The final flush failed; the dirty data stays in the cache directory.
    #[error(
        "shut down without flushing everything ({blocks} dirty blocks, {bytes} bytes, stay in the cache directory for the next start)"
    )]
    Shutdown {
        /// Dirty blocks before the flush.
        blocks: u64,
        /// Dirty bytes before the flush.
        bytes: u64,
        /// Why the flush failed.
        #[source]
        source: blockcache::Error,
    },
}

/// `error` and its causes, `: `-separated. A cause whose text its parent already tells (an
/// error that prints its source and also returns it) is not told twice.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut told = error.to_string();
    let mut parent = told.clone();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !parent.contains(&text) {
            told.push_str(": ");
            told.push_str(&text);
        }
        parent = text;
        next = cause.source();
    }
    told
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    /// Prints its source and returns it too.
    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn chain_tells_each_cause_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(chain(&e), "outer: middle: inner");
    }
}
