//! `blockcache`: the daemon (`blockcache serve`) and its command-line clients.
//!
//! `serve` runs the block cache behind an HTTP file API (see `server`). The other
//! subcommands talk to a running daemon, reaching it with the same settings (`--listen`,
//! `--auth-token`, `--config`, or `BLOCKCACHE_*`).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod check;
mod client;
mod connections;
mod error;
mod restore;
mod s3;
mod server;
mod settings;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockcache::{BlockCache, Namespace};
use blockcache_backend::Backend;
use blockcache_db::Db;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::error::{ServeError, chain};
use crate::settings::{LogFormat, Settings, SettingsFile};

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

// The command line is parsed once: the size of `Serve`'s settings costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        settings: Settings,
        // Read by `settings::parse`, which makes its values the defaults.
        #[command(flatten)]
        file: SettingsFile,
    },
    /// Print the usage of a running daemon (a summary, or all of it as JSON).
    Stats {
        #[command(flatten)]
        target: client::Target,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
    },
    /// Wait until everything written to a running daemon is in the store.
    Flush {
        #[command(flatten)]
        target: client::Target,
        /// Only this file
        #[arg(long)]
        name: Option<String>,
    },
    /// Compare the database, the store and the cache (through the running daemon, or on the
    /// stopped volume); exit 0 when consistent, 1 when not, 2 on error.
    Check {
        #[command(flatten)]
        args: check::CheckArgs,
        #[command(flatten)]
        settings: Settings,
        #[command(flatten)]
        file: SettingsFile,
    },
    /// Upload dirty data, then empty the cache of a running daemon.
    DropCache(client::Target),
    /// Store a file from FILE or standard input (with -r, a directory tree under NAME/).
    Put {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
        /// Local file (default, or "-": standard input); with -r, a directory
        file: Option<PathBuf>,
        /// none, local or store (default: the daemon's)
        #[arg(long)]
        durability: Option<String>,
        /// Store every file under the directory FILE as NAME/PATH
        #[arg(short, long)]
        recursive: bool,
    },
    /// Write a file to FILE or standard output (with -r, every file under NAME/ into a
    /// directory).
    Get {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
        /// Local file (default, or "-": standard output); with -r, a directory
        file: Option<PathBuf>,
        /// Write every file named NAME/PATH to the directory FILE as PATH
        #[arg(short, long)]
        recursive: bool,
    },
    /// Print what the daemon knows of one file: size, time, ETag, where its blocks are.
    Stat {
        #[command(flatten)]
        target: client::Target,
        /// Name in the daemon
        name: String,
        /// Print the daemon's JSON
        #[arg(long)]
        json: bool,
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
        /// Sizes in bytes rather than KiB, MiB, ...
        #[arg(long)]
        bytes: bool,
        /// One JSON array of the files (name, size, mtime, etag)
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Build a new data directory from the store alone (the machine's disk is lost).
    Restore(restore::RestoreArgs),
}

fn main() -> ExitCode {
    let cli: Cli = match settings::parse() {
        Ok(cli) => cli,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blockcache: cannot start the runtime: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "blockcache",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let Command::Check { args, settings, .. } = cli.command {
        let code = runtime.block_on(check::run(settings, args));
        runtime.shutdown_background();
        return code;
    }
    let result = runtime.block_on(async move {
        let client = match cli.command {
            Command::Serve { settings, .. } => {
                return serve(settings).await.map_err(Failure::Serve);
            }
            Command::Stats { target, json } => client::stats(target, json).await,
            Command::Flush { target, name } => client::flush(target, name).await,
            Command::DropCache(t) => client::drop_cache(t).await,
            Command::Put {
                target,
                name,
                file,
                durability,
                recursive: false,
            } => client::put(target, name, file, durability).await,
            Command::Put {
                target,
                name,
                file,
                durability,
                recursive: true,
            } => client::put_tree(target, name, file, durability).await,
            Command::Get {
                target,
                name,
                file,
                recursive: false,
            } => client::get(target, name, file).await,
            Command::Get {
                target,
                name,
                file,
                recursive: true,
            } => client::get_tree(target, name, file).await,
            Command::Stat { target, name, json } => client::stat(target, name, json).await,
            Command::Rm { target, name } => client::rm(target, name).await,
            Command::Ls {
                target,
                prefix,
                bytes,
                json,
            } => client::ls(target, prefix, bytes, json).await,
            Command::Restore(args) => restore::run(args).await,
            Command::Check { .. } | Command::Completions { .. } => {
                unreachable!("handled above")
            }
        };
        client.map_err(Failure::Client)
    });
    // Whatever is still running (a client's connection after the shutdown deadline, a
    // blocking call) is not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Serve(e)) => fail(&e),
        Err(Failure::Client(message)) => {
            eprintln!("blockcache: {message}");
            ExitCode::FAILURE
        }
    }
}

/// How a command failed.
enum Failure {
    /// The daemon.
    Serve(ServeError),
    /// A client, with its message.
    Client(String),
}

/// Prints `error` with its causes; the exit code of a failure.
fn fail(error: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("blockcache: {}", chain(error));
    ExitCode::FAILURE
}

fn init_logging(settings: &Settings) -> Result<(), ServeError> {
    // Colours only for a terminal: a log file gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(settings.log_level.filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match settings.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(ServeError::Logging)
}

/// Prints a line of the daemon's start on standard output, for whoever started it. A
/// standard output that is closed or whose reader is gone (a supervisor that does not
/// read it) is no reason to stop: `println!` would panic on it.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::debug!(error = %e, "standard output is gone; the line went to the log only");
    }
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
        // A path rather than a URL, which holds no credentials.
        Err(_) if !url.contains("://") || !url.contains('@') => url.to_owned(),
        Err(_) => "<unparsable URL>".to_owned(),
    }
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

async fn serve(s: Settings) -> Result<(), ServeError> {
    s.check().map_err(ServeError::Settings)?;
    init_logging(&s)?;
    if s.exposed() {
        return Err(ServeError::Exposed {
            addr: s.endpoint.listen,
        });
    }
    let s3_keys = settings::s3_credentials(
        s.s3_access_key.as_deref(),
        s.s3_secret_key.as_ref(),
        s.s3_credentials_file.as_deref(),
    )
    .map_err(ServeError::Settings)?;
    if let Some(addr) = s.s3_listen.0
        && !addr.ip().is_loopback()
        && s3_keys.is_empty()
        && !s.insecure
    {
        return Err(ServeError::S3Exposed { addr });
    }
    if s.multipart_expiry.0 < Duration::from_secs(1) {
        return Err(ServeError::Settings(format!(
            "--multipart-expiry {}: an upload must be kept at least 1s",
            s.multipart_expiry
        )));
    }
    // The addresses first: a port in use stops the start before anything is opened or made.
    let listen = s.endpoint.listen;
    let listener_error = |source| ServeError::Listener {
        addr: listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(listener_error)?;
    let s3_listener =
        match s.s3_listen.0 {
            None => None,
            Some(s3_addr) => Some(tokio::net::TcpListener::bind(s3_addr).await.map_err(
                |source| ServeError::S3Listener {
                    addr: s3_addr,
                    source,
                },
            )?),
        };
    let data_dir_error = |source| ServeError::DataDir {
        path: s.data_dir.clone(),
        source,
    };
    let data_dir = std::path::absolute(&s.data_dir).map_err(data_dir_error)?;
    if s.uses_data_dir() {
        if std::fs::metadata(&data_dir).is_ok_and(|m| !m.is_dir()) {
            return Err(data_dir_error(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "it is a file, not a directory: give a directory, or a path that does not exist yet",
            )));
        }
        std::fs::create_dir_all(&data_dir).map_err(data_dir_error)?;
    }
    let database = s.database(&data_dir);
    let store = s.store(&data_dir);
    let mut config = s.engine_config(s.cache_dir(&data_dir));
    config.encryption = s.secret().map_err(ServeError::Settings)?;

    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .map_err(ServeError::Metrics)?
        .install_recorder()
        .map_err(ServeError::Metrics)?;
    let process = metrics_process::Collector::default();
    telemetry::describe(&process);

    let db = Db::open(&database)
        .await
        .map_err(|source| ServeError::Database {
            url: redact(&database),
            source,
        })?;
    let store_error = |source| ServeError::Store {
        url: redact(&store),
        source: Box::new(source),
    };
    let backend = Backend::open(&store, s.store_timeout.0).map_err(store_error)?;
    // A store that cannot work is found now, with what to change, not at the first upload.
    backend.check().await.map_err(store_error)?;
    let cache = BlockCache::open(config, db, backend)
        .await
        .map_err(ServeError::Cache)?;
    let recovery = cache.recovery().clone();
    tracing::info!(
        clean_files = recovery.clean_files,
        dirty_files = recovery.dirty_files,
        unknown_files = recovery.unknown_files.len(),
        unconfirmed_objects = recovery.unconfirmed_objects,
        confirmed_in_store = recovery.confirmed_in_store,
        lost_blocks = recovery.lost_blocks.len(),
        pending_deletions = recovery.pending_deletions,
        "cache open"
    );
    let block_size = cache.config().block_size;
    let ns = Namespace::open(cache, s.max_file_size.0)
        .await
        .map_err(ServeError::Namespace)?;

    let addr = listener.local_addr().map_err(listener_error)?;
    let fd_limit = connections::raise_fd_limit();
    let max_connections = connections::connection_limit(s.max_connections, fd_limit);
    if max_connections < s.max_connections {
        tracing::warn!(
            fd_limit,
            max_connections,
            "serving at most {max_connections} connections, not {}: half the limit of open files ({}) stays for the engine",
            s.max_connections,
            fd_limit.unwrap_or(0)
        );
    }
    let bounds = connections::Bounds {
        header_timeout: s.header_timeout.0,
        body_timeout: s.body_timeout.0,
        max_connections,
    };
    let buffer_count = server::buffer_permits(s.buffer_memory.0, block_size);
    let state = Arc::new(server::AppState {
        ns,
        durability: s.durability,
        token: s.endpoint.auth_token.clone(),
        draining: Default::default(),
        metrics: metrics.clone(),
        process,
        buffers: Arc::new(tokio::sync::Semaphore::new(buffer_count)),
        buffer_count,
        buffer_timeout: s.buffer_timeout.0,
    });
    // Every clone of the router (one per connection) carries a sender of `alive`, and every
    // request a further one: the channel closes once the last of them is gone, and with them
    // every clone of the state.
    let (alive, mut all_gone) = tokio::sync::mpsc::channel::<()>(1);
    let app = server::router(state.clone()).layer(axum::Extension(alive.clone()));
    announce(&format!("blockcache listening on http://{addr}"));
    tracing::info!(
        %addr,
        store = %redact(&store),
        database = %redact(&database),
        max_connections,
        fd_limit,
        "listening"
    );

    let expiry = s3::spawn_expiry(state.clone(), s.multipart_expiry.0);
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });
    let s3 = match (s.s3_listen.0, s3_listener) {
        (Some(s3_addr), Some(s3_listener)) => {
            let s3_error = |source| ServeError::S3Listener {
                addr: s3_addr,
                source,
            };
            let bound = s3_listener.local_addr().map_err(s3_error)?;
            let domains: Vec<String> = s
                .s3_domain
                .as_deref()
                .map(|d| {
                    d.split(',')
                        .map(|x| x.trim().to_owned())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            let router = s3::router(state.clone(), &s3_keys, &domains)
                .map_err(ServeError::Settings)?
                .layer(axum::Extension(alive.clone()));
            announce(&format!("blockcache S3 endpoint on http://{bound}"));
            tracing::info!(addr = %bound, keys = s3_keys.len(), "serving S3");
            Some((s3_listener, router))
        }
        _ => None,
    };
    // The routers hold their clones of `alive`: the channel closes once they are gone.
    drop(alive);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
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
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let http = async {
        tokio::join!(
            shutdown,
            connections::serve(listener, app, bounds, stopped(stop_rx.clone()))
        )
        .1
    };
    let s3_serve = async {
        match s3 {
            Some((l, router)) => {
                Some(connections::serve(l, router, bounds, stopped(stop_rx.clone())).await)
            }
            None => None,
        }
    };
    let (open, s3_open) = tokio::join!(http, s3_serve);
    let open = match s3_open {
        Some(s3_open) => connections::Open::both(open, s3_open),
        None => connections::Open::one(open),
    };
    upkeep.abort();
    // The expiry holds a clone of the state: it goes before the state is taken back.
    expiry.abort();
    let _ = expiry.await;

    // From here on, the shutdown has a deadline: clients still connected and the final
    // flush get what is left of it.
    let deadline = tokio::time::Instant::now() + s.shutdown_timeout.0;
    let timeout = s.shutdown_timeout;
    let connected = open.count();
    // Every connection is closed once their tasks have dropped their routers.
    let clients = async {
        open.shutdown().await;
        let _ = all_gone.recv().await;
    };
    if tokio::time::timeout_at(deadline, clients).await.is_err() {
        let dirty = state.ns.cache().usage().await.ok();
        return Err(ServeError::Deadline {
            timeout,
            waiting_for: format!("{connected} client connections"),
            blocks: dirty.as_ref().map_or(0, |u| u.dirty_entries),
            bytes: dirty.map_or(0, |u| u.dirty_bytes),
        });
    }
    let state = Arc::try_unwrap(state).map_err(|_| ServeError::StillShared)?;
    let before = state.ns.cache().usage().await.ok();
    let (blocks, bytes) = before
        .as_ref()
        .map_or((0, 0), |u| (u.dirty_entries, u.dirty_bytes));
    let past_deadline = || ServeError::Deadline {
        timeout,
        waiting_for: "the final flush".to_owned(),
        blocks,
        bytes,
    };
    // The flush first, on its own, so that the line can tell what it uploaded (dirty
    // blocks whose content the store already holds upload nothing). A failed flush leaves
    // the dirty data where the next start finds it; the shutdown would only try again.
    let Ok(flushed) = tokio::time::timeout_at(deadline, state.ns.flush()).await else {
        return Err(past_deadline());
    };
    if let Err(source) = flushed {
        return Err(ServeError::Shutdown {
            blocks,
            bytes,
            source,
        });
    }
    let after = state.ns.cache().usage().await.ok();
    let (uploads, upload_bytes) = match (&before, &after) {
        (Some(b), Some(a)) => (
            a.uploads.saturating_sub(b.uploads),
            a.upload_bytes.saturating_sub(b.upload_bytes),
        ),
        _ => (0, 0),
    };
    let Ok(result) = tokio::time::timeout_at(deadline, state.ns.shutdown()).await else {
        return Err(past_deadline());
    };
    match result {
        Ok(()) => {
            tracing::info!(
                dirty_blocks = blocks,
                dirty_bytes = bytes,
                uploads,
                upload_bytes,
                "shut down: flushed {blocks} dirty blocks ({bytes} bytes) to the store: {uploads} objects ({upload_bytes} bytes) uploaded, the rest was there already"
            );
            Ok(())
        }
        Err(source) => Err(ServeError::Shutdown {
            blocks,
            bytes,
            source,
        }),
    }
}
