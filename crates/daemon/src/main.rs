//! `blockcache`: the daemon (`blockcache serve`) and its command-line clients.
//!
//! `serve` runs the block cache behind an HTTP file API (see `server`). The other
//! subcommands talk to a running daemon, reaching it with the same settings (`--listen`,
//! `--auth-token`, `--config`, or `BLOCKCACHE_*`).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod client;
mod server;
mod settings;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockcache::{BlockCache, Config, Namespace};
use blockcache_backend::Backend;
use blockcache_db::Db;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::settings::{LogFormat, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "blockcache",
    version,
    about = "A block cache in front of object storage, served over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        settings: Settings,
        /// TOML settings file (keys as the long flags: block-size = "1MiB")
        #[arg(long, env = "BLOCKCACHE_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the usage of a running daemon as JSON.
    Stats(client::Target),
    /// Wait until everything written to a running daemon is in the store.
    Flush {
        #[command(flatten)]
        target: client::Target,
        /// Only this file
        #[arg(long)]
        name: Option<String>,
    },
    /// Upload dirty data, then empty the cache of a running daemon.
    DropCache(client::Target),
    /// Store a file from FILE or standard input.
    Put {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
        /// Local file (default, or "-": standard input)
        file: Option<PathBuf>,
        /// none, local or store (default: the daemon's)
        #[arg(long)]
        durability: Option<String>,
    },
    /// Write a file to FILE or standard output.
    Get {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
        /// Local file (default, or "-": standard output)
        file: Option<PathBuf>,
    },
    /// Delete a file.
    Rm {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
    },
    /// List files: size, modification time, name.
    Ls {
        #[command(flatten)]
        target: client::Target,
        /// Only names starting with this
        prefix: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blockcache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { settings, config } => serve(settings, config).await,
            Command::Stats(t) => client::stats(t).await,
            Command::Flush { target, name } => client::flush(target, name).await,
            Command::DropCache(t) => client::drop_cache(t).await,
            Command::Put {
                target,
                name,
                file,
                durability,
            } => client::put(target, name, file, durability).await,
            Command::Get { target, name, file } => client::get(target, name, file).await,
            Command::Rm { target, name } => client::rm(target, name).await,
            Command::Ls { target, prefix } => client::ls(target, prefix).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("blockcache: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) -> Result<(), String> {
    let filter = settings.log_level.as_deref().unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("invalid log-level {filter:?}: {e}; write a level (error, warn, info, debug, trace) or a filter such as blockcache=debug,warn"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match settings.log_format.unwrap_or_default() {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

/// `url` without the credentials it may carry, for logs and errors.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            format!("{u} (credentials hidden)")
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("cannot resolve {}: {e}", p.display()))
}

/// Waits for SIGINT or SIGTERM.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

async fn serve(flags: Settings, config: Option<PathBuf>) -> Result<(), String> {
    let file = match &config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let s = flags.or(file);
    init_logging(&s)?;
    s.check_exposure()?;

    let data_dir = absolute(&s.data_dir())?;
    let cache_dir = match &s.cache_dir {
        Some(d) => d.clone(),
        None => data_dir.join("cache"),
    };
    let needs_data_dir = s.database.is_none() || s.store.is_none();
    if needs_data_dir {
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
    }
    let database = s
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("meta.db").display()));
    let store = s
        .store
        .clone()
        .unwrap_or_else(|| format!("file://{}", data_dir.join("store").display()));

    let mut config = Config::new(cache_dir);
    if let Some(v) = s.block_size {
        config.block_size = v.0;
    }
    if let Some(v) = s.max_cache_size {
        config.max_bytes = v.0;
    }
    if let Some(v) = s.max_entries {
        config.max_entries = v;
    }
    if let Some(v) = s.max_dirty {
        config.max_dirty_bytes = v.0;
    }
    if let Some(v) = s.upload_tasks {
        config.upload_tasks = v;
    }
    if let Some(v) = s.upload_delay {
        config.commit_delay = (!v.0.is_zero()).then_some(v.0);
    }

    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .map_err(|e| format!("cannot set up metrics: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot set up metrics: {e}"))?;

    let db = Db::open(&database)
        .await
        .map_err(|e| format!("cannot open database {}: {e}", redact(&database)))?;
    let backend = Backend::from_url(&store)
        .map_err(|e| format!("cannot use store {}: {e}", redact(&store)))?;
    let cache = BlockCache::open(config, db, backend)
        .await
        .map_err(|e| format!("cannot open the cache: {e}"))?;
    let recovery = cache.recovery().clone();
    tracing::info!(?recovery, "cache open");
    let block_size = cache.config().block_size;
    let ns = Namespace::open(cache, s.max_file_size())
        .await
        .map_err(|e| format!("cannot open the file namespace: {e}"))?;

    let listener = tokio::net::TcpListener::bind(s.listen_addr())
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", s.listen_addr()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    let state = Arc::new(server::AppState {
        ns,
        durability: s.durability(),
        token: s.auth_token.clone(),
        draining: Default::default(),
        metrics: metrics.clone(),
        buffers: Arc::new(tokio::sync::Semaphore::new(server::buffer_permits(
            s.buffer_memory.map_or(64 << 20, |m| m.0),
            block_size,
        ))),
    });
    // Every clone of the router (one per connection) carries a sender of `alive`, and every
    // request a further one: the channel closes once the last of them is gone, and with them
    // every clone of the state.
    let (alive, mut all_gone) = tokio::sync::mpsc::channel::<()>(1);
    let app = server::router(state.clone()).layer(axum::Extension(alive));
    println!("blockcache listening on http://{addr}");
    tracing::info!(%addr, store = %redact(&store), database = %redact(&database), "listening");

    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });
    let draining = state.clone();
    let shutdown = async move {
        signal().await;
        draining.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            "signal received: finishing requests, then flushing; a second signal exits at once"
        );
        tokio::spawn(async {
            signal().await;
            tracing::error!(
                "second signal: exiting at once; dirty data stays in the cache directory and the next start uploads it"
            );
            std::process::exit(130);
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    upkeep.abort();

    // Every connection is closed; wait until their tasks have dropped their routers.
    let _ = all_gone.recv().await;
    let state = Arc::try_unwrap(state)
        .map_err(|_| "the server state is still shared after every connection closed")?;
    let before = state.ns.cache().usage().await.ok();
    let result = state.ns.shutdown().await;
    let (blocks, bytes) = before.map_or((0, 0), |u| (u.dirty_entries, u.dirty_bytes));
    match result {
        Ok(()) => {
            tracing::info!(
                dirty_blocks = blocks,
                dirty_bytes = bytes,
                "shut down: flushed {blocks} dirty blocks ({bytes} bytes) to the store"
            );
            Ok(())
        }
        Err(e) => Err(format!(
            "shut down without flushing everything ({blocks} dirty blocks, {bytes} bytes, stay in the cache directory for the next start): {e}"
        )),
    }
}
