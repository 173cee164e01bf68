//! `blockcache restore`: a new data directory from the store alone.

use std::path::{Path, PathBuf};

use blockcache::restore::{self, RestoreOptions, RestoreProgress};
use blockcache_backend::Backend;
use blockcache_db::Db;
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::chain;
use crate::settings::Timeout;

/// Options of `blockcache restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The volume's store (the URL `serve` used, with its prefix)
    #[arg(long, env = "BLOCKCACHE_STORE", value_name = "URL")]
    pub store: String,
    /// New data directory to build (must be empty or absent); `serve --data-dir` takes it
    #[arg(long, env = "BLOCKCACHE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// File of the volume's encryption key
    #[arg(
        long,
        env = "BLOCKCACHE_ENCRYPTION_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "encryption_passphrase_file"
    )]
    pub encryption_key_file: Option<PathBuf>,
    /// File of the volume's encryption passphrase
    #[arg(
        long,
        env = "BLOCKCACHE_ENCRYPTION_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub encryption_passphrase_file: Option<PathBuf>,
    /// Restore this generation (see --list) instead of the newest complete one
    #[arg(long, value_name = "N")]
    pub generation: Option<u64>,
    /// List the metadata generations in the store, and restore nothing
    #[arg(long)]
    pub list: bool,
    /// Take the volume's writer lease even though its holder's has not expired: only when
    /// that holder's machine is known to be dead
    #[arg(long, env = "BLOCKCACHE_FORCE_TAKEOVER")]
    pub force_takeover: bool,
    /// Longest a store operation takes, retries included
    #[arg(long, env = "BLOCKCACHE_STORE_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(std::time::Duration::from_secs(30)))]
    pub store_timeout: Timeout,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// Whether `dir` holds nothing but, possibly, the store's own directory (a `file://`
/// store inside the data directory, as `serve` has by default).
fn is_empty_but_store(dir: &Path, store: &str) -> Result<bool, String> {
    let store_dir = store
        .strip_prefix("file://")
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p)));
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(format!(
                "--data-dir {} is a file, not a directory",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("cannot read --data-dir {}: {e}", dir.display())),
    };
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read --data-dir {}: {e}", dir.display()))?;
        let path = std::path::absolute(entry.path()).unwrap_or_else(|_| entry.path());
        if store_dir
            .as_ref()
            .is_some_and(|s| s == &path || s.starts_with(&path))
        {
            continue;
        }
        return Ok(false);
    }
    Ok(true)
}

fn secret(args: &RestoreArgs) -> Result<Option<blockcache::Secret>, String> {
    crate::settings::secret_from(
        args.encryption_key_file.as_deref(),
        args.encryption_passphrase_file.as_deref(),
    )
}

/// Runs `blockcache restore`.
pub async fn run(args: RestoreArgs) -> Result<(), String> {
    let backend = Backend::open(&args.store, args.store_timeout.0).map_err(|e| {
        format!(
            "cannot use store {}: {}",
            crate::redact(&args.store),
            chain(&e)
        )
    })?;
    if args.list {
        let generations = restore::list_generations(&backend)
            .await
            .map_err(|e| chain(&e))?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&generations).expect("serializes")
            );
        } else if generations.is_empty() {
            println!("no metadata generation in the store");
        } else {
            println!("generation  complete  parts  deltas       bytes  last written");
            for g in &generations {
                println!(
                    "{:>10}  {:>8}  {:>5}  {:>6}  {:>10}  {}",
                    g.generation,
                    if g.complete { "yes" } else { "no" },
                    g.parts,
                    g.deltas,
                    g.bytes,
                    g.last_written
                );
            }
        }
        return Ok(());
    }
    let Some(data_dir) = args.data_dir.clone() else {
        return Err(
            "--data-dir is required: the new data directory to build (or --list)".to_owned(),
        );
    };
    if !is_empty_but_store(&data_dir, &args.store)? {
        return Err(format!(
            "--data-dir {} is not empty: a restore builds a new data directory; give an empty or absent one (move the old one away first)",
            data_dir.display()
        ));
    }
    let options = RestoreOptions {
        encryption: secret(&args)?,
        generation: args.generation,
        force_takeover: args.force_takeover,
        ..RestoreOptions::default()
    };
    // A directory that was there (empty) stays; one this restore creates goes if it fails.
    let existed = data_dir.is_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create --data-dir {}: {e}", data_dir.display()))?;
    let db_path = data_dir.join("meta.db");
    let db = Db::open(&format!("sqlite://{}", db_path.display()))
        .await
        .map_err(|e| {
            format!(
                "cannot create the database {}: {}",
                db_path.display(),
                chain(&e)
            )
        })?;
    let bar = progress_bar();
    let shown = bar.clone();
    let progress = move |p: RestoreProgress| {
        shown.set_length(p.total);
        shown.set_position(p.done);
    };
    let restored = restore::restore(&db, backend, &options, &progress).await;
    bar.finish_and_clear();
    db.close().await;
    drop(db);
    let report = match restored {
        Ok(r) => r,
        Err(e) => {
            // Nothing of a failed restore is kept: the data directory is as it was.
            for suffix in ["", "-wal", "-shm", ".lock"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
            }
            if !existed {
                let _ = std::fs::remove_dir(&data_dir);
            }
            return Err(format!("restore failed: {}", chain(&e)));
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serializes")
        );
    } else {
        for s in &report.skipped {
            println!("skipped: {s}");
        }
        if let Some(s) = &report.stopped {
            println!("stopped early: {s}");
        }
        println!(
            "restored volume {} from generation {} (+{} deltas): {} files, {} blocks, {} objects into {}",
            report.volume,
            report.generation,
            report.deltas,
            report.counts.files,
            report.counts.blocks,
            report.counts.objects,
            data_dir.display()
        );
        if !report.missing_objects.is_empty() {
            println!(
                "warning: {} objects the metadata names are not in the store; reads of their blocks fail. Files affected: {}",
                report.missing_objects.len(),
                report.broken_files.join(", ")
            );
        }
        println!(
            "start it with: blockcache serve --data-dir {} --store {}",
            data_dir.display(),
            crate::redact(&args.store)
        );
    }
    Ok(())
}

fn progress_bar() -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    ProgressBar::new(0).with_style(
        ProgressStyle::with_template("restoring metadata {bar:40} {pos}/{len} objects")
            .expect("a valid template"),
    )
}
