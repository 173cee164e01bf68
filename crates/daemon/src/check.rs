//! `blockcache check`: through the running daemon (`POST /v1/check`) when one answers at
//! `--listen`, otherwise on the volume directly, opened with the `serve` settings and shut
//! down cleanly afterwards. Exit code 0 when the volume is consistent, 1 when it is not, 2
//! when the check could not run.

use std::process::ExitCode;
use std::time::Duration;

use blockcache::{BlockCache, CheckOptions, CheckReport};
use blockcache_backend::Backend;
use blockcache_db::Db;

use crate::error::chain;
use crate::settings::{Settings, Size};

/// What `check` was asked to do, besides where the volume is.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Fix what can be fixed without losing data: delete leaked objects, rebuild refcounts,
    /// upload missing objects again from the cache, drop stale cache files
    #[arg(long)]
    pub repair: bool,
    /// Download every object and check its SHA-256 (at most --verify-rate)
    #[arg(long)]
    pub verify_data: bool,
    /// Print the report as JSON instead of the summary
    #[arg(long)]
    pub json: bool,
    /// Age (by the store's clock) from which an object nothing references counts as leaked
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = crate::server::parse_grace)]
    pub grace: Duration,
    /// Most bytes per second downloaded by --verify-data
    #[arg(long, value_name = "SIZE", default_value_t = Size(blockcache::DEFAULT_VERIFY_RATE),
          value_parser = Size::between(1, u64::MAX))]
    pub verify_rate: Size,
}

impl CheckArgs {
    fn options(&self) -> CheckOptions {
        CheckOptions {
            repair: self.repair,
            verify_data: self.verify_data,
            grace: self.grace,
            verify_rate: self.verify_rate.0,
        }
    }
}

/// Exit code of a check that could not run.
const ERROR: u8 = 2;

/// Runs `blockcache check`.
pub async fn run(settings: Settings, args: CheckArgs) -> ExitCode {
    let report = match crate::client::check(&settings.endpoint, &args).await {
        Ok(Some(report)) => Ok(report),
        // Nothing listens: the volume is checked directly.
        Ok(None) => direct(&settings, &args).await,
        Err(message) => Err(message),
    };
    match report {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{report}");
            }
            if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(message) => {
            eprintln!("blockcache: check: {message}");
            ExitCode::from(ERROR)
        }
    }
}

/// Opens the volume as `serve` would (data directory, database, store, key), checks it and
/// shuts it down.
async fn direct(s: &Settings, args: &CheckArgs) -> Result<CheckReport, String> {
    s.check()?;
    let filter = s.log_level.filter();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let data_dir = std::path::absolute(&s.data_dir)
        .map_err(|e| format!("data directory {}: {e}", s.data_dir.display()))?;
    let database = s.database(&data_dir);
    let path = database
        .strip_prefix("sqlite://")
        .or_else(|| database.strip_prefix("sqlite:"))
        .unwrap_or(&database);
    let path = path.split('?').next().unwrap_or(path);
    if !std::path::Path::new(path).exists() {
        return Err(format!(
            "no daemon answers at {} and there is no volume at {path} (give the settings the daemon runs with: --data-dir, --database, --listen)",
            s.endpoint.listen
        ));
    }
    let store = s.store(&data_dir);
    let mut config = s.engine_config(s.cache_dir(&data_dir));
    config.encryption = s.secret()?;
    let db = Db::open(&database)
        .await
        .map_err(|e| format!("database {}: {}", crate::redact(&database), chain(&e)))?;
    let store_error =
        |e: blockcache_backend::Error| format!("store {}: {}", crate::redact(&store), chain(&e));
    let backend = Backend::open(&store, s.store_timeout.0).map_err(store_error)?;
    backend.check().await.map_err(store_error)?;
    let cache = BlockCache::open(config, db, backend)
        .await
        .map_err(|e| chain(&e))?;
    let checked = cache.check(args.options()).await;
    let closed = cache.shutdown().await;
    let report = checked.map_err(|e| chain(&e))?;
    if let Err(e) = closed {
        return Err(format!(
            "{report}\nthe check ran, but shutting the volume down failed: {}",
            chain(&e)
        ));
    }
    Ok(report)
}
