//! The metadata workload (`--only metadata`): what shipping the metadata to the store costs,
//! and what restoring from it costs, through [`blockcache::Namespace`] on a plain volume with
//! a `file://` store on the cache's disk.
//!
//! For each volume size (`--ship-files`, 10,000 and 100,000 files by default), a child
//! process:
//! - creates the files, one block of 4 KiB each (unique content), with 8 writers, in batches
//!   of at most [`BATCH`] files, each batch followed by a flush (which uploads the blocks and
//!   ships their metadata);
//! - then patches one file (100 bytes at offset 100, `none` durability) and flushes, again and
//!   again, until a snapshot of the whole metadata has been written ([`SNAPSHOT_AFTER`] deltas
//!   of the generation), at most [`MAX_PATCHES`] times: the metadata bytes each flush
//!   uploaded (the engine's `metadata_status().bytes_written` before and after) give the delta
//!   of one small change (median and largest), the snapshot's round, and the mean over the
//!   whole cycle (what a flush after one small change costs on average, snapshots included);
//! - shuts the volume down, then times the reference: a copy of the volume's SQLite file
//!   (with its WAL if any) into a new file with `fsync` (what restoring a local backup of the
//!   database would cost), and the restore ([`blockcache::restore::restore`]) of the store's
//!   newest generation into a new, empty database; the restored files are counted.
//!
//! The library workload's children of a run give the time spent shipping (`ship_s`, the
//! engine's `ship_time`) as a fraction of their write+flush; with `--baseline-bench EXE`,
//! the library workload of another build of the benchmark (one without shipping) runs
//! alternately with this one's, and write+flush is compared run by run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use blockcache::restore::{RestoreOptions, list_generations, restore};
use blockcache::{Durability, Namespace};
use blockcache_backend::Backend;
use blockcache_db::Db;

use crate::{Args, Error, Sample, Stat, fill, label, open};

/// The volume sizes of a run unless `--ship-files` names others.
pub const DEFAULT_FILES: [u64; 2] = [10_000, 100_000];

/// The block size of the volumes.
const BLOCK: u64 = 4096;

/// Files created between two flushes.
const BATCH: u64 = 25_000;

/// Concurrent writers while creating the files.
const WRITERS: u64 = 8;

/// The engine writes a new snapshot after this many deltas of a generation.
const SNAPSHOT_AFTER: u64 = 64;

/// Patches at most (a flush may ship no delta: changes held back are shipped by the next).
const MAX_PATCHES: u64 = 3 * SNAPSHOT_AFTER;

/// The name of file `i`.
fn name(i: u64) -> String {
    format!("dir{:03}/file{i:07}", i % 1000)
}

/// The group of the workload on `files` files.
pub fn group(files: u64) -> String {
    format!("ship/{files}")
}

/// The library workload's groups in a run with `--baseline-bench`: this build, the baseline.
pub fn lib_groups(bs: u64) -> (String, String) {
    let l = label(bs);
    (format!("ship-lib/{l}"), format!("ship-lib-baseline/{l}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One child: the volume of `files` files (see the module comment).
pub async fn ship(args: &Args, files: u64) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("ship-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = open(&dir, BLOCK, 2 * files * BLOCK + (64 << 20)).await?;
    let ns = Arc::new(Namespace::open(cache, 1 << 40).await?);
    let mut s = Sample::default();
    let mut put = |k: &str, v: f64| {
        s.values.insert(k.to_owned(), v);
    };
    put("files", files as f64);

    let start = Instant::now();
    let mut first = 0;
    while first < files {
        let end = (first + BATCH).min(files);
        let mut tasks = Vec::new();
        for t in 0..WRITERS {
            let ns = ns.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; BLOCK as usize];
                let mut i = first + t;
                while i < end {
                    fill(&mut buf, i + 1);
                    let mut w = ns.create(&name(i)).await?;
                    w.write(&buf).await?;
                    w.finish(Durability::None).await?;
                    i += WRITERS;
                }
                Ok::<_, Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        ns.flush().await?;
        first = end;
    }
    let create = start.elapsed();
    put("create_s", create.as_secs_f64());
    put("create_files_per_s", files as f64 / create.as_secs_f64());
    let status = ns.cache().metadata_status().await?;
    put("create_meta_bytes", status.bytes_written as f64);
    put("create_ship_s", status.ship_time.as_secs_f64());

    // One small change, then a flush, until a snapshot was written.
    let mut delta_bytes = Vec::new();
    let mut flush_ms = Vec::new();
    let mut snapshot_bytes = 0.0;
    let mut cycle_bytes = 0.0;
    let mut cycle_flushes = 0u64;
    let mut before = status;
    let patch = vec![0x5a_u8; 100];
    for p in 0..MAX_PATCHES {
        // Files spread over the volume, a different one each time.
        let i = (p * 7919) % files;
        let start = Instant::now();
        let mut w = ns.patch(&name(i), 100).await?;
        w.write(&patch).await?;
        w.finish(Durability::None).await?;
        ns.flush().await?;
        flush_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let after = ns.cache().metadata_status().await?;
        let bytes = (after.bytes_written - before.bytes_written) as f64;
        let snapshot = after.generation != before.generation;
        cycle_bytes += bytes;
        cycle_flushes += 1;
        before = after;
        if snapshot {
            snapshot_bytes = bytes;
            break;
        }
        delta_bytes.push(bytes);
    }
    // Flushes that shipped nothing (the change was held back for the next round).
    put(
        "empty_flushes",
        delta_bytes.iter().filter(|&&b| b == 0.0).count() as f64,
    );
    put(
        "delta_bytes_max",
        delta_bytes.iter().copied().fold(0.0, f64::max),
    );
    put("delta_bytes", median(&mut delta_bytes));
    // Zero if no snapshot came within the patches.
    put("snapshot_bytes", snapshot_bytes);
    put("cycle_flushes", cycle_flushes as f64);
    put("cycle_bytes_per_flush", cycle_bytes / cycle_flushes as f64);
    put("patch_flush_ms", median(&mut flush_ms));
    put(
        "patch_flush_ms_max",
        flush_ms.iter().copied().fold(0.0, f64::max),
    );
    // After the snapshot, a few deltas on top, as a restore usually finds.
    for p in 0..3 {
        let i = (p * 104_729 + 1) % files;
        let mut w = ns.patch(&name(i), 200).await?;
        w.write(&patch).await?;
        w.finish(Durability::None).await?;
        ns.flush().await?;
    }
    Arc::into_inner(ns)
        .ok_or("namespace still shared")?
        .shutdown()
        .await?;

    // The reference: a copy of the database file with fsync.
    let db_path = dir.join("meta.db");
    let copy_path = dir.join("copy.db");
    let start = Instant::now();
    let mut db_bytes = 0;
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", db_path.display());
        if std::path::Path::new(&from).exists() {
            let to = format!("{}{suffix}", copy_path.display());
            db_bytes += std::fs::copy(&from, &to)?;
            std::fs::File::open(&to)?.sync_all()?;
        }
    }
    std::fs::File::open(&dir)?.sync_all()?;
    let copy = start.elapsed();
    put("db_bytes", db_bytes as f64);
    put("ref_copy_s", copy.as_secs_f64());

    // The restore into a new, empty database.
    let backend = Backend::from_url(&format!(
        "file://{}",
        dir.join("store").canonicalize()?.display()
    ))?;
    let generations = list_generations(&backend).await?;
    let newest = generations
        .iter()
        .rev()
        .find(|g| g.complete)
        .ok_or("no complete metadata generation in the store")?;
    put("generation_bytes", newest.bytes as f64);
    put("generation_deltas", newest.deltas as f64);
    let restored_dir = dir.join("restored");
    std::fs::create_dir_all(&restored_dir)?;
    let start = Instant::now();
    let db = Db::open(
        restored_dir
            .join("meta.db")
            .to_str()
            .ok_or("path not UTF-8")?,
    )
    .await?;
    let report = restore(&db, backend, &RestoreOptions::default(), &|_| {}).await?;
    db.close().await;
    let restore_time = start.elapsed();
    drop(db);
    if report.counts.files != files || !report.missing_objects.is_empty() {
        return Err(format!(
            "restored {} files of {files}, {} objects missing",
            report.counts.files,
            report.missing_objects.len()
        )
        .into());
    }
    put("restore_s", restore_time.as_secs_f64());
    put(
        "restore_ratio",
        restore_time.as_secs_f64() / copy.as_secs_f64(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// The summary of the metadata workload.
pub fn print(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let get = |group: &str, key: &str| stats.get(group).and_then(|g| g.get(key));
    let range = |s: Option<&Stat>, scale: f64, places: usize| {
        s.map_or("-".to_owned(), |s| {
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median / scale,
                s.min / scale,
                s.max / scale
            )
        })
    };
    println!(
        "\nmetadata workload: files of one 4 KiB block through the namespace, plain volume, file:// store on the cache's disk, median of {} runs (min-max)",
        args.runs
    );
    for &files in &args.ship_files {
        let g = group(files);
        println!(
            "{files:>7} files: created at {} files/s ({} s, metadata shipped meanwhile {} KiB in {} s)",
            range(get(&g, "create_files_per_s"), 1.0, 0),
            range(get(&g, "create_s"), 1.0, 1),
            range(get(&g, "create_meta_bytes"), 1024.0, 0),
            range(get(&g, "create_ship_s"), 1.0, 2),
        );
        println!(
            "{:>7}  one small change + flush: delta {} KiB (largest {} KiB), snapshot every {SNAPSHOT_AFTER} deltas {} KiB, mean over the cycle of {} flushes {} KiB; patch+flush {} ms (largest {} ms)",
            "",
            range(get(&g, "delta_bytes"), 1024.0, 1),
            range(get(&g, "delta_bytes_max"), 1024.0, 1),
            range(get(&g, "snapshot_bytes"), 1024.0, 0),
            range(get(&g, "cycle_flushes"), 1.0, 0),
            range(get(&g, "cycle_bytes_per_flush"), 1024.0, 1),
            range(get(&g, "patch_flush_ms"), 1.0, 1),
            range(get(&g, "patch_flush_ms_max"), 1.0, 1),
        );
        println!(
            "{:>7}  flushes that shipped nothing (the change held back to the next round): {}",
            "",
            range(get(&g, "empty_flushes"), 1.0, 0),
        );
        println!(
            "{:>7}  restore {} s = {}x the copy of the database ({} s for {} MiB with fsync); generation restored {} KiB with {} deltas",
            "",
            range(get(&g, "restore_s"), 1.0, 2),
            range(get(&g, "restore_ratio"), 1.0, 1),
            range(get(&g, "ref_copy_s"), 1.0, 3),
            range(get(&g, "db_bytes"), (1 << 20) as f64, 1),
            range(get(&g, "generation_bytes"), 1024.0, 0),
            range(get(&g, "generation_deltas"), 1.0, 0),
        );
    }
    for &bs in &args.block_sizes {
        let (lib, base) = lib_groups(bs);
        let l = label(bs);
        println!(
            "library {l}: write+flush {} MiB/s, shipping {} s = {} % of write+flush",
            range(get(&lib, "write_flush_mib_s"), 1.0, 1),
            range(get(&lib, "ship_s"), 1.0, 3),
            range(get(&lib, "ship_fraction"), 0.01, 2),
        );
        if stats.contains_key(&base) {
            println!(
                "library {l}: baseline build write+flush {} MiB/s; this build against it, run by run: {}x",
                range(get(&base, "write_flush_mib_s"), 1.0, 1),
                range(get(&lib, "vs_baseline_write_flush"), 1.0, 3),
            );
        }
    }
}

/// Adds to each library sample of this build its write+flush against the baseline's sample
/// of the same run.
pub fn add_ratios(results: &mut BTreeMap<String, Vec<crate::Sample>>, block_sizes: &[u64]) {
    for &bs in block_sizes {
        let (lib, base) = lib_groups(bs);
        let Some(base) = results.get(&base).cloned() else {
            continue;
        };
        let Some(lib) = results.get_mut(&lib) else {
            continue;
        };
        for (s, b) in lib.iter_mut().zip(&base) {
            if let (Some(&a), Some(&r)) = (
                s.values.get("write_flush_mib_s"),
                b.values.get("write_flush_mib_s"),
            ) && r > 0.0
            {
                s.values.insert("vs_baseline_write_flush".into(), a / r);
            }
        }
    }
}
