//! `blockcache-bench`: the benchmark behind `cargo xtask bench`.
//!
//! Every figure is a ratio against a reference measured in the same run on the same disk,
//! because the machines are shared and noisy. Each configuration runs in a child process of
//! its own, so peak RSS is per configuration. Each figure is the median of `--runs` runs, with
//! min and max. Results go to the terminal and to a JSON file under `bench/results/`.
//!
//! Workloads:
//! - library: files of 8 MiB written block by block with a fraction of block-aligned
//!   duplicates, then: write (+ sync: local durability), flush (until in the store), cold
//!   read (after dropping the cache), hot read, remove (until the store is empty);
//! - metadata: many 4 KiB blocks: commits per second (flush) and removes per second;
//! - daemon (`daemon.rs`): the same files through the HTTP API of the release `blockcache`
//!   binary with 1 and 8 concurrent clients (write + flush, cold read, hot read), and the same
//!   again through its S3 endpoint (object_store's S3 client: PutObject, GetObject), each
//!   against the file API with as many clients in the same run (S3 / file API, run by run);
//!   `--only daemon` runs this workload alone;
//! - patch (`patch.rs`): files of 8 MiB written, stored and cached, changed in place by one
//!   writer through the `Namespace` and through the daemon at the daemon's block size: 4 KiB
//!   patches (`local`, then `none`), block-sized patches, truncations, each against
//!   `pwrite`/`ftruncate` (+ `fdatasync`) on plain files in the same child; `--only patch`
//!   runs this workload alone;
//! - format (`format.rs`): the library workload's write+flush and cold read with compression
//!   and encryption, on text-like and on random content, against the plain volume in the same
//!   run; `--only format` runs this workload alone;
//! - metadata shipping (`metadata.rs`, `--only metadata`): the metadata bytes a flush uploads
//!   after one small change, and the restore time, on volumes of 10,000 and 100,000 files,
//!   against a copy of the database file; the time the library workload spends shipping, and
//!   (`--baseline-bench`) its write+flush against a build without shipping;
//! - remote (`remote.rs`, `--only remote`): the file namespace in front of a real S3 server
//!   (s3s-fs, in a process of its own) behind a delaying proxy at several round trips and a
//!   bandwidth cap: write+flush, cold reads by 1 and 8 readers, hot read, as ratios to
//!   loopback, with the requests and the egress against the unique bytes;
//! - plain (`plain.rs`, `--only plain`): one plain blocking HTTP client on one connection
//!   sending 64 MiB files one after another through the daemon (default durability), then
//!   reading them hot, against copy+sync and page-cache reads of the same bytes;
//! - references: SHA-256 on one core and on all cores; copying the same bytes into a directory
//!   on the same disk with fsync; reading them back.
//!
//! `BLOCKCACHE_BENCH_LOG=<filter>` (e.g. `blockcache=debug`) prints the engine's spans with
//! their timings on standard error, for profiling a phase.
//! `BLOCKCACHE_BENCH_S3_UNSIGNED=1` has the S3 client send unsigned payloads (no SHA-256 of
//! each body on either side).
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod chart;
mod daemon;
mod format;
mod metadata;
mod patch;
mod plain;
mod remote;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockcache::{BlockCache, Config};
use blockcache_backend::Backend;
use blockcache_db::Db;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const FILE_BYTES: u64 = 8 << 20;
const MIB: f64 = (1 << 20) as f64;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
struct Args {
    data_mib: u64,
    runs: usize,
    block_sizes: Vec<u64>,
    dup: f64,
    meta_blocks: u64,
    dir: PathBuf,
    out: PathBuf,
    child: Option<String>,
    block_size: u64,
    daemon_block_size: u64,
    /// Data of the daemon workload, and of the library run it is compared with: at least
    /// 8 files of [`FILE_BYTES`], so that each of the 8 clients has files to send.
    daemon_data_mib: u64,
    rss_factor: u64,
    /// Runs only this workload (`--only patch`); the run's files get its name as a suffix.
    only: Option<String>,
    /// Data of each configuration of the format workload, per content.
    format_mib: u64,
    /// The configurations of the format workload (`format.rs`).
    format_configs: Vec<String>,
    /// In a child: the format configuration of a library run (`--format`), on `content`.
    format: Option<String>,
    /// In a child: `text` or `random` (`--content`), with `--format`.
    content: String,
    /// The volume sizes (files) of the metadata workload; in a child, its one size.
    ship_files: Vec<u64>,
    /// Another build of this benchmark whose library workload runs alternately with this
    /// one's in the metadata workload (a build without metadata shipping).
    baseline_bench: Option<PathBuf>,
    /// The remote workload's S3 server (child `s3-server`): the round trip its proxy adds.
    rtt_ms: u64,
    /// ... and its bandwidth cap in Mbit/s (0: none).
    rate_mbit: u64,
    /// The remote workload's links (`--links 100ms`, names of [`remote::CONFIGS`]); loopback,
    /// which the ratios divide by, always runs.
    links: Vec<String>,
}

/// The workloads `--only` accepts.
const ONLY: [&str; 6] = ["patch", "format", "metadata", "daemon", "remote", "plain"];

fn parse_size(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix(['K', 'k']) {
        (n, 1 << 10)
    } else if let Some(n) = s.strip_suffix(['M', 'm']) {
        (n, 1 << 20)
    } else {
        (s, 1)
    };
    Ok(num
        .parse::<u64>()
        .map_err(|e| format!("bad size {s:?}: {e}"))?
        * mult)
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        data_mib: 32,
        runs: 3,
        block_sizes: vec![64 << 10, 1 << 20, 4 << 20],
        dup: 0.5,
        meta_blocks: 100_000,
        dir: PathBuf::from("target/bench-tmp"),
        out: PathBuf::from("bench/results"),
        child: None,
        block_size: 1 << 20,
        daemon_block_size: 1 << 20,
        daemon_data_mib: 128,
        rss_factor: 4,
        only: None,
        format_mib: 32,
        format_configs: format::DEFAULT_CONFIGS.map(str::to_owned).to_vec(),
        format: None,
        content: "random".to_owned(),
        ship_files: metadata::DEFAULT_FILES.to_vec(),
        baseline_bench: None,
        rtt_ms: 0,
        rate_mbit: 0,
        links: remote::CONFIGS.iter().map(|l| l.name.to_owned()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--" => {}
            "--data-mib" => a.data_mib = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--block-sizes" => {
                a.block_sizes = value()?
                    .split(',')
                    .map(parse_size)
                    .collect::<Result<_, _>>()?
            }
            "--dup" => a.dup = value()?.parse()?,
            "--meta-blocks" => a.meta_blocks = value()?.parse()?,
            "--dir" => a.dir = value()?.into(),
            "--out" => a.out = value()?.into(),
            "--child" => a.child = Some(value()?),
            "--block-size" => a.block_size = parse_size(&value()?)?,
            "--daemon-block-size" => a.daemon_block_size = parse_size(&value()?)?,
            "--rss-factor" => a.rss_factor = value()?.parse()?,
            "--daemon-data-mib" => a.daemon_data_mib = value()?.parse()?,
            "--format-mib" => a.format_mib = value()?.parse()?,
            "--format-configs" => {
                let configs: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                for spec in &configs {
                    for content in format::CONTENTS {
                        format::Setup::parse(spec, content)?;
                    }
                }
                a.format_configs = configs;
            }
            "--format" => a.format = Some(value()?),
            "--content" => a.content = value()?,
            "--ship-files" => {
                a.ship_files = value()?
                    .split(',')
                    .map(|n| {
                        n.parse::<u64>()
                            .map_err(|e| format!("--ship-files {n:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--baseline-bench" => a.baseline_bench = Some(value()?.into()),
            "--rtt-ms" => a.rtt_ms = value()?.parse()?,
            "--rate-mbit" => a.rate_mbit = value()?.parse()?,
            "--links" => {
                let names: Vec<&str> = remote::CONFIGS.iter().map(|l| l.name).collect();
                a.links = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = a.links.iter().find(|l| !names.contains(&l.as_str())) {
                    return Err(
                        format!("--links {bad:?}: allowed values: {}", names.join(", ")).into(),
                    );
                }
            }
            "--only" => {
                let only = value()?;
                if !ONLY.contains(&only.as_str()) {
                    return Err(
                        format!("--only {only:?}: allowed values: {}", ONLY.join(", ")).into(),
                    );
                }
                a.only = Some(only);
            }
            "--help" | "-h" => {
                println!(
                    "usage: blockcache-bench [--data-mib N] [--runs N] [--block-sizes 64K,1M,4M] [--dup 0.5] [--meta-blocks N] [--daemon-block-size 1M] [--daemon-data-mib 128] [--rss-factor 4] [--format-mib 32] [--format-configs plain,plain-copy,zstd,lz4,none+enc,zstd+enc] [--only patch|format|metadata|daemon|remote|plain] [--ship-files 10000,100000] [--links loopback,20ms,100ms,20ms-400mbit] [--baseline-bench EXE] [--dir DIR] [--out DIR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other:?}").into()),
        }
    }
    if a.data_mib == 0
        || a.daemon_data_mib == 0
        || a.format_mib == 0
        || a.runs == 0
        || a.ship_files.contains(&0)
        || !(0.0..=1.0).contains(&a.dup)
    {
        return Err(
            "--data-mib, --daemon-data-mib, --format-mib, --ship-files and --runs must be positive and --dup within 0..=1"
                .into(),
        );
    }
    Ok(a)
}

/// Fills `buf` with bytes derived from `seed` (xorshift; fast, so generation does not weigh
/// on the figures).
fn fill(buf: &mut [u8], seed: u64) {
    // Four independent xorshift lanes, 32 bytes a round: the generator runs at several
    // times memory speed, so the data's source weighs little next to what is measured.
    // Each lane starts at its own point of the generator's cycle (splitmix64 of the seed and
    // the lane): lanes seeded as consecutive outputs of one xorshift would be the same
    // sequence one step apart, and each 32 bytes would repeat 24 of the previous ones
    // (zstd stored such "random" blocks at a quarter of their size).
    let step = xorshift;
    let mut lanes = [0u64; 4];
    for (i, lane) in lanes.iter_mut().enumerate() {
        *lane = splitmix64(seed.wrapping_mul(4).wrapping_add(i as u64)) | 1;
    }
    let mut chunks = buf.chunks_exact_mut(32);
    for chunk in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            chunk[i * 8..i * 8 + 8].copy_from_slice(&step(lane).to_le_bytes());
        }
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b = (lanes[i / 8] >> (8 * (i % 8))) as u8;
    }
}

/// The splitmix64 mix of `z`: spreads nearby seeds over the whole range.
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One step of the xorshift generator `x`: its next value.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The content seed of global block `g`: a duplicate repeats the previous block's content.
fn seed_of(g: u64, dup: f64) -> u64 {
    let mut g = g;
    loop {
        let h = g.wrapping_mul(0xD6E8_FEB8_6659_FD93) >> 11;
        let is_dup = g > 0 && (h as f64 / (1u64 << 53) as f64) < dup;
        if !is_dup {
            return g;
        }
        g -= 1;
    }
}

/// Peak resident set (VmHWM) of process `pid`, in bytes.
fn peak_rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Block buffers of generated data, reused once written or sent: neither the library's
/// writers nor the daemon's client pay for fresh pages each block.
#[derive(Clone, Default)]
struct Spares(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Spares {
    /// A buffer of `len` bytes (their content is whatever was there).
    fn take(&self, len: usize) -> Vec<u8> {
        let spare = self.0.lock().expect("spares poisoned").pop();
        let mut buf = spare.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Keeps `buf` for the next `take`.
    fn give(&self, buf: Vec<u8>) {
        self.0.lock().expect("spares poisoned").push(buf);
    }
}

/// With `BLOCKCACHE_BENCH_WRITE_ONLY` set, the library and daemon workloads stop after
/// write+flush: a profiler attached to the whole run then sees that phase alone.
fn write_only() -> bool {
    std::env::var_os("BLOCKCACHE_BENCH_WRITE_ONLY").is_some()
}

/// With `BLOCKCACHE_BENCH_S3_UNSIGNED` set, the S3 client sends `UNSIGNED-PAYLOAD` instead
/// of each body's SHA-256 (object_store's default), which it then need not compute, nor the
/// endpoint check: for telling that cost apart from the endpoint's own.
fn s3_unsigned_payload() -> bool {
    std::env::var_os("BLOCKCACHE_BENCH_S3_UNSIGNED").is_some()
}

/// CPU seconds (user and system, all threads) a process has used so far, from
/// `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name may hold spaces: fields are counted after its `)`.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Sample {
    /// Figures by name: MiB/s, operations per second, bytes.
    values: BTreeMap<String, f64>,
}

/// Marks `dir`, where the children keep their files, as the top of unrelated trees (ext4's
/// `TOPDIR` flag, as `chattr +T`), so that ext4 puts each child's directory in a block group
/// of its own choosing, not next to the files the previous child just deleted. On ext4
/// without a journal (as on the machines the README's figures come from), creating a file
/// skips every inode of its group deleted in the last half minute (five while the inode
/// table is not written back), one lookup each: a child that creates thousands of files
/// right after another deleted thousands in the same group spent up to three times the CPU
/// per MiB. Best effort: other file systems keep their own placement.
fn spread_children(dir: &std::path::Path) {
    let Ok(d) = std::fs::File::open(dir) else {
        return;
    };
    if let Ok(flags) = rustix::fs::ioctl_getflags(&d)
        && !flags.contains(rustix::fs::IFlags::TOPDIR)
    {
        let _ = rustix::fs::ioctl_setflags(&d, flags | rustix::fs::IFlags::TOPDIR);
    }
}

/// A plain volume (no compression, no encryption: objects are hard links to cache files),
/// as every workload but `format` measures: the engine's own costs, which the format
/// workload then compares the compressed and encrypted formats with.
async fn open(dir: &Path, block_size: u64, max_bytes: u64) -> Result<BlockCache, Error> {
    let plain = format::Setup {
        compression: Some(blockcache_backend::format::Compression::None),
        ..format::Setup::default()
    };
    Ok(open_with(dir, block_size, max_bytes, &plain).await?.0)
}

/// [`open`] with the volume set up as `setup` says; also returns the backend, whose listing
/// gives the bytes in the store.
async fn open_with(
    dir: &Path,
    block_size: u64,
    max_bytes: u64,
    setup: &format::Setup,
) -> Result<(BlockCache, Backend), Error> {
    std::fs::create_dir_all(dir)?;
    let mut config = Config::new(dir.join("cache"));
    if let Some(compression) = setup.compression {
        config.compression = compression;
    }
    config.encryption = setup.secret();
    config.block_size = block_size;
    config.max_bytes = max_bytes.max(block_size);
    config.max_entries = 10_000_000;
    // Everything written stays dirty until the phase that is timed: no commits under
    // pressure nor by age while the data is being written (writing many small blocks can
    // take longer than the commit delay, and the timed phase would then commit only the
    // rest while counting every block).
    config.max_dirty_bytes = config.max_bytes;
    config.upload_delay = None;
    let db = Db::open(dir.join("meta.db").to_str().ok_or("path not UTF-8")?).await?;
    std::fs::create_dir_all(dir.join("store"))?;
    let mut backend = Backend::from_url(&format!(
        "file://{}",
        dir.join("store").canonicalize()?.display()
    ))?;
    if setup.no_links {
        backend = backend.without_links();
    }
    Ok((
        BlockCache::open(config, db, backend.clone()).await?,
        backend,
    ))
}

/// Runs `f` over every (inode, blockno) with `parallel` tasks, one stripe of files each.
async fn for_all_blocks<F, Fut>(
    files: u64,
    blocks_per_file: u64,
    parallel: u64,
    f: F,
) -> Result<(), Error>
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    let f = Arc::new(f);
    let mut tasks = Vec::new();
    for t in 0..parallel {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut file = t;
            while file < files {
                for b in 0..blocks_per_file {
                    f(file, b).await?;
                }
                file += parallel;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Removes inodes `1..=files` and waits until the store has deleted their objects; returns
/// the time taken.
async fn remove_all(cache: &BlockCache, files: u64) -> Result<Duration, Error> {
    let start = Instant::now();
    for file in 0..files {
        cache.remove(file + 1, 0..u64::MAX).await?;
    }
    if !cache.wait_for_removals(Duration::from_secs(600)).await {
        return Err("removals did not finish".into());
    }
    Ok(start.elapsed())
}

async fn library(args: &Args) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("lib-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bs = args.block_size;
    let total = args.data_mib << 20;
    let files = total.div_ceil(FILE_BYTES);
    let blocks_per_file = FILE_BYTES.div_ceil(bs);
    let logical = files * blocks_per_file * bs;
    // Without a format configuration, a plain volume (see `open`).
    let setup = match &args.format {
        Some(spec) => format::Setup::parse(spec, &args.content)?,
        None => format::Setup {
            compression: Some(blockcache_backend::format::Compression::None),
            ..format::Setup::default()
        },
    };
    let (cache, backend) = open_with(&dir, bs, 2 * logical + (64 << 20), &setup).await?;
    let cache = Arc::new(cache);
    // The format workload stores every block: its store bytes are the format's doing.
    let dup = if args.format.is_some() { 0.0 } else { args.dup };
    let text = setup.text;
    let fill_block = move |buf: &mut [u8], file: u64, b: u64| {
        let seed = seed_of(file * blocks_per_file + b, dup);
        if text {
            format::fill_text(buf, seed);
        } else {
            fill(buf, seed);
        }
    };
    let block_of = move |file: u64, b: u64| -> Vec<u8> {
        let mut buf = vec![0; bs as usize];
        fill_block(&mut buf, file, b);
        buf
    };
    let mut unique = std::collections::HashSet::new();
    for g in 0..files * blocks_per_file {
        unique.insert(seed_of(g, dup));
    }
    let unique_bytes = unique.len() as u64 * bs;
    let mut s = Sample::default();
    let mut put = |k: &str, v: f64| {
        s.values.insert(k.to_owned(), v);
    };
    let mib_s = |t: Duration| logical as f64 / MIB / t.as_secs_f64();

    let c = cache.clone();
    let spares = Spares::default();
    // The format workload generates its blocks before the timed phase: text is slower to
    // generate than random bytes, and a cost common to every configuration would pull each
    // ratio towards 1.
    let pregenerated: Arc<Vec<Vec<u8>>> = Arc::new(if args.format.is_some() {
        (0..files * blocks_per_file)
            .map(|g| block_of(g / blocks_per_file, g % blocks_per_file))
            .collect()
    } else {
        Vec::new()
    });
    // Shipping done before the timed phase (at open: reading the store's metadata, the new
    // volume's first, empty, generation) is not part of write+flush.
    let shipped_before = cache.metadata_status().await?.ship_time;
    put("open_ship_s", shipped_before.as_secs_f64());
    let cpu = cpu_of(std::process::id());
    let start = Instant::now();
    for_all_blocks(files, blocks_per_file, 4, move |file, b| {
        let c = c.clone();
        let spares = spares.clone();
        let pregenerated = pregenerated.clone();
        let data = if pregenerated.is_empty() {
            let mut data = spares.take(bs as usize);
            fill_block(&mut data, file, b);
            Some(data)
        } else {
            None
        };
        async move {
            match data {
                Some(data) => {
                    c.write(file + 1, b, 0, &data).await?;
                    spares.give(data);
                }
                None => {
                    let block = &pregenerated[(file * blocks_per_file + b) as usize];
                    c.write(file + 1, b, 0, block).await?;
                }
            }
            Ok(())
        }
    })
    .await?;
    cache.sync().await?;
    let write = start.elapsed();
    let start = Instant::now();
    cache.flush().await?;
    let flush = start.elapsed();
    put("write_flush_cpu_s", cpu_of(std::process::id()) - cpu);
    put("write_mib_s", mib_s(write));
    put("flush_mib_s", mib_s(flush));
    put("write_flush_mib_s", mib_s(write + flush));
    // The time write+flush spent shipping the metadata to the store.
    let ship = cache.metadata_status().await?.ship_time - shipped_before;
    put("ship_s", ship.as_secs_f64());
    put(
        "ship_fraction",
        ship.as_secs_f64() / (write + flush).as_secs_f64(),
    );
    let usage = cache.usage().await?;
    put("stored_bytes", usage.stored_bytes as f64);
    // What the store holds, from its listing: the objects' sizes with their headers.
    put("store_bytes", backend.stored_bytes().await? as f64);
    put("unique_bytes", unique_bytes as f64);
    put("logical_bytes", logical as f64);
    if write_only() {
        return Ok(s);
    }

    cache.clear().await?;
    let c = cache.clone();
    let cpu = cpu_of(std::process::id());
    let start = Instant::now();
    for_all_blocks(files, blocks_per_file, 4, move |file, b| {
        let c = c.clone();
        async move {
            let got = c.read(file + 1, b, 0, bs as usize).await?;
            if got.len() as u64 != bs {
                return Err(format!("block {b} of file {file}: {} bytes", got.len()).into());
            }
            Ok(())
        }
    })
    .await?;
    put("cold_read_mib_s", mib_s(start.elapsed()));
    put("cold_read_cpu_s", cpu_of(std::process::id()) - cpu);
    let c = cache.clone();
    let start = Instant::now();
    for_all_blocks(files, blocks_per_file, 4, move |file, b| {
        let c = c.clone();
        async move {
            c.read(file + 1, b, 0, bs as usize).await?;
            Ok(())
        }
    })
    .await?;
    put("hot_read_mib_s", mib_s(start.elapsed()));
    // Check correctness once, outside the timed phases.
    for file in 0..files {
        let got = cache
            .read(file + 1, blocks_per_file - 1, 0, bs as usize)
            .await?;
        if got[..] != block_of(file, blocks_per_file - 1)[..] {
            return Err(format!("file {file} read back wrong").into());
        }
    }
    let remove = remove_all(&cache, files).await?;
    put("remove_mib_s", mib_s(remove));
    put("peak_rss_bytes", peak_rss_of(std::process::id()) as f64);
    Arc::into_inner(cache)
        .ok_or("cache still shared")?
        .shutdown()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// The reference for unique small blocks: every one becomes a file of the store, so this
/// machine's rate of creating small files bounds them. `n` files of 4 KiB are written the way
/// a local store writes objects (a temporary name, then a rename into one of 256 shard
/// directories) by 8 threads (the default upload tasks), then one `sync`. Files per second.
fn small_files_reference(dir: &Path, n: u64) -> Result<f64, Error> {
    let _ = std::fs::remove_dir_all(dir);
    for shard in 0..256 {
        std::fs::create_dir_all(dir.join(format!("{shard:02x}")))?;
    }
    let threads = 8u64;
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<(), Error> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> std::io::Result<()> {
                    let mut block = vec![0u8; 4096];
                    let mut i = t;
                    while i < n {
                        fill(&mut block, i + 1);
                        let path = dir.join(format!("{:02x}/{i}", i & 0xff));
                        let tmp = path.with_extension("tmp");
                        std::fs::write(&tmp, &block)?;
                        std::fs::rename(&tmp, &path)?;
                        i += threads;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "file thread panicked")??;
        }
        Ok(())
    })?;
    let synced = Command::new("sync").status()?;
    if !synced.success() {
        return Err("sync failed".into());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    // Write the deletions back, so that the workload after this one does not pay for them.
    Command::new("sync").status()?;
    Ok(rate)
}

async fn metadata(args: &Args) -> Result<Sample, Error> {
    let mut s = Sample::default();
    let files_dir = args.dir.join(format!("files-{}", std::process::id()));
    s.values.insert(
        "small_files_per_s".into(),
        small_files_reference(&files_dir, args.meta_blocks)?,
    );
    // Unique content: every commit registers an object and uploads it to the local store.
    // Duplicate content: every commit links to one object; this is the metadata path alone.
    for (name, unique) in [("", true), ("dup_", false)] {
        let dir = args.dir.join(format!("meta-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bs = 4096u64;
        let n = args.meta_blocks;
        let cache = Arc::new(open(&dir, bs, 2 * n * bs + (64 << 20)).await?);
        let files = n.div_ceil(1000);
        let c = cache.clone();
        for_all_blocks(files, 1000, 4, move |file, b| {
            let c = c.clone();
            async move {
                let mut buf = vec![0; bs as usize];
                fill(&mut buf, if unique { file * 1000 + b + 1 } else { 1 });
                Ok(c.write(file + 1, b, 0, &buf).await?)
            }
        })
        .await?;
        let blocks = (files * 1000) as f64;
        let start = Instant::now();
        cache.commit().await?;
        let commit = start.elapsed();
        cache.flush().await?;
        let flush = start.elapsed();
        let remove = remove_all(&cache, files).await?;
        s.values.insert(
            format!("{name}commit_only_per_s"),
            blocks / commit.as_secs_f64(),
        );
        s.values
            .insert(format!("{name}commits_per_s"), blocks / flush.as_secs_f64());
        s.values.insert(
            format!("{name}removes_per_s"),
            blocks / remove.as_secs_f64(),
        );
        Arc::into_inner(cache)
            .ok_or("cache still shared")?
            .shutdown()
            .await?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(s)
}

fn reference(args: &Args) -> Result<Sample, Error> {
    let mut s = Sample::default();
    let bytes = (args.data_mib << 20) as usize;
    // SHA-256 on one core and on all cores, over 4 MiB buffers.
    let mut buf = vec![0u8; 4 << 20];
    fill(&mut buf, 7);
    let rounds = (bytes / buf.len()).max(4);
    let start = Instant::now();
    let mut acc = 0u8;
    for _ in 0..rounds {
        acc ^= Sha256::digest(&buf)[0];
    }
    let one = start.elapsed();
    s.values.insert(
        "sha256_1core_mib_s".into(),
        (rounds * buf.len()) as f64 / MIB / one.as_secs_f64(),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf = Arc::new(buf);
    let start = Instant::now();
    let handles: Vec<_> = (0..cores)
        .map(|_| {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut acc = 0u8;
                for _ in 0..rounds {
                    acc ^= Sha256::digest(&buf[..])[0];
                }
                acc
            })
        })
        .collect();
    for h in handles {
        acc ^= h.join().map_err(|_| "hash thread panicked")?;
    }
    let all = start.elapsed();
    s.values.insert(
        "sha256_all_cores_mib_s".into(),
        (cores * rounds * buf.len()) as f64 / MIB / all.as_secs_f64(),
    );
    s.values.insert("cores".into(), cores as f64);
    std::hint::black_box(acc);
    // Copy the same bytes into files on the same disk, fsync each, then the directory.
    let dir = args.dir.join(format!("ref-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let files = (bytes as u64).div_ceil(FILE_BYTES);
    let blocks_per_file = FILE_BYTES.div_ceil(args.block_size);
    let mut block = vec![0u8; args.block_size as usize];
    let start = Instant::now();
    for f in 0..files {
        let mut file = std::fs::File::create(dir.join(f.to_string()))?;
        for b in 0..blocks_per_file {
            fill(&mut block, seed_of(f * blocks_per_file + b, args.dup));
            file.write_all(&block)?;
        }
        file.sync_all()?;
    }
    std::fs::File::open(&dir)?.sync_all()?;
    let copy = start.elapsed();
    let logical = files * blocks_per_file * args.block_size;
    s.values.insert(
        "copy_sync_mib_s".into(),
        logical as f64 / MIB / copy.as_secs_f64(),
    );
    let start = Instant::now();
    let mut sink = 0u8;
    for f in 0..files {
        let data = std::fs::read(dir.join(f.to_string()))?;
        sink ^= data[data.len() / 2];
    }
    std::hint::black_box(sink);
    s.values.insert(
        "read_back_mib_s".into(),
        logical as f64 / MIB / start.elapsed().as_secs_f64(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

fn run_child(
    args: &Args,
    kind: &str,
    block_size: u64,
    data_mib: u64,
    extra: &[&str],
) -> Result<Sample, Error> {
    run_child_of(None, args, kind, block_size, data_mib, extra, &[])
}

/// [`run_child`] of the benchmark `exe` (this one if `None`), with `env` added to the
/// child's environment.
fn run_child_of(
    exe: Option<&Path>,
    args: &Args,
    kind: &str,
    block_size: u64,
    data_mib: u64,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<Sample, Error> {
    // Start every configuration from a quiet disk: write back what earlier configurations
    // (and builds) left dirty, so their writeback does not land in this one's fsyncs.
    let synced = Command::new("sync").status()?;
    if !synced.success() {
        return Err("sync failed".into());
    }
    let exe = match exe {
        Some(exe) => exe.to_owned(),
        None => std::env::current_exe()?,
    };
    let output = Command::new(exe)
        .args([
            "--child",
            kind,
            "--block-size",
            &block_size.to_string(),
            "--data-mib",
            &data_mib.to_string(),
            "--dup",
            &args.dup.to_string(),
            "--meta-blocks",
            &args.meta_blocks.to_string(),
            "--dir",
            &args.dir.display().to_string(),
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "{kind} benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[derive(Debug, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[Sample]) -> BTreeMap<String, Stat> {
    let mut out = BTreeMap::new();
    let Some(first) = samples.first() else {
        return out;
    };
    for key in first.values.keys() {
        let mut v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.values.get(key).copied())
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        out.insert(
            key.clone(),
            Stat {
                median: v[v.len() / 2],
                min: v[0],
                max: v[v.len() - 1],
            },
        );
    }
    out
}

fn label(bs: u64) -> String {
    if bs >= 1 << 20 {
        format!("{}M", bs >> 20)
    } else {
        format!("{}K", bs >> 10)
    }
}

fn main() -> Result<(), Error> {
    let args = parse_args()?;
    // For profiling: `BLOCKCACHE_BENCH_LOG=debug` prints the engine's spans (with their busy
    // and idle times) as they close, on standard error.
    if let Ok(filter) = std::env::var("BLOCKCACHE_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    if args.child.as_deref() == Some("s3-server") {
        return remote::server(&args);
    }
    if let Some(kind) = args.child.clone() {
        // The daemon's client runs on one thread: it only moves bytes to sockets, and a
        // second thread would add wakeups on the cores the daemon needs.
        let runtime = if kind.starts_with("daemon") {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
        };
        let sample = match kind.as_str() {
            "library" => runtime.block_on(library(&args))?,
            "metadata" => runtime.block_on(metadata(&args))?,
            "reference" => reference(&args)?,
            "daemon1" => runtime.block_on(daemon::daemon(&args, 1, daemon::Api::Http))?,
            "daemon8" => runtime.block_on(daemon::daemon(&args, 8, daemon::Api::Http))?,
            "daemon1-s3" => runtime.block_on(daemon::daemon(&args, 1, daemon::Api::S3))?,
            "daemon8-s3" => runtime.block_on(daemon::daemon(&args, 8, daemon::Api::S3))?,
            "patch" => runtime.block_on(patch::library(&args))?,
            "daemon-patch" => runtime.block_on(patch::daemon(&args))?,
            "remote" => runtime.block_on(remote::remote(&args))?,
            "plain" => plain::plain(&args)?,
            "ship" => {
                let files = *args.ship_files.first().ok_or("--ship-files is empty")?;
                runtime.block_on(metadata::ship(&args, files))?
            }
            other => return Err(format!("unknown child {other:?}").into()),
        };
        println!("{}", serde_json::to_string(&sample)?);
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)?;
    spread_children(&args.dir);
    let results: std::cell::RefCell<BTreeMap<String, Vec<Sample>>> = Default::default();
    let started = Instant::now();
    let all = args.only.is_none();
    let only = |w: &str| all || args.only.as_deref() == Some(w);
    let child_with =
        |group: String, kind: &str, bs: u64, mib: u64, extra: &[&str]| -> Result<(), Error> {
            let t = Instant::now();
            let sample = run_child(&args, kind, bs, mib, extra)?;
            eprintln!("  {group}: {:.1} s", t.elapsed().as_secs_f64());
            results.borrow_mut().entry(group).or_default().push(sample);
            Ok(())
        };
    let child = |group: String, kind: &str, bs: u64, mib: u64| -> Result<(), Error> {
        child_with(group, kind, bs, mib, &[])
    };
    // The daemon workload: for each number of clients, the file API and the S3 endpoint one
    // after the other, the one first alternating between runs.
    let daemons = |run: usize| -> Result<(), Error> {
        let dbs = args.daemon_block_size;
        for n in daemon::CLIENTS {
            let mut apis = [daemon::Api::Http, daemon::Api::S3];
            if run % 2 == 1 {
                apis.reverse();
            }
            for api in apis {
                child(
                    daemon::group(n, api, dbs),
                    &daemon::kind(n, api),
                    dbs,
                    args.daemon_data_mib,
                )?;
            }
        }
        Ok(())
    };
    for run in 0..args.runs {
        eprintln!(
            "run {}/{} ({:.0} s so far)",
            run + 1,
            args.runs,
            started.elapsed().as_secs_f64()
        );
        if all {
            for &bs in &args.block_sizes {
                child(
                    format!("reference/{}", label(bs)),
                    "reference",
                    bs,
                    args.data_mib,
                )?;
                child(
                    format!("library/{}", label(bs)),
                    "library",
                    bs,
                    args.data_mib,
                )?;
            }
            let dbs = args.daemon_block_size;
            if !args.block_sizes.contains(&dbs) {
                child(
                    format!("reference/{}", label(dbs)),
                    "reference",
                    dbs,
                    args.data_mib,
                )?;
                child(
                    format!("library/{}", label(dbs)),
                    "library",
                    dbs,
                    args.data_mib,
                )?;
            }
            daemons(run)?;
            // Peak RSS must not grow with the data: the same workload on more data.
            child(
                format!("library-x{}/{}", args.rss_factor, label(dbs)),
                "library",
                dbs,
                args.data_mib * args.rss_factor,
            )?;
            // The library on the daemon's data, unless the run above was just that.
            if args.daemon_data_mib != args.data_mib * args.rss_factor {
                child(
                    daemon_library_group(&args),
                    "library",
                    dbs,
                    args.daemon_data_mib,
                )?;
            }
        }
        if !all && only("daemon") {
            daemons(run)?;
        }
        if only("patch") {
            let dbs = args.daemon_block_size;
            child(format!("patch/{}", label(dbs)), "patch", dbs, args.data_mib)?;
            child(
                format!("patch-daemon/{}", label(dbs)),
                "daemon-patch",
                dbs,
                args.data_mib,
            )?;
        }
        if only("metadata") && !all {
            for &files in &args.ship_files {
                child_with(
                    metadata::group(files),
                    "ship",
                    4096,
                    args.data_mib,
                    &["--ship-files", &files.to_string()],
                )?;
            }
            for &bs in &args.block_sizes {
                let (lib, base) = metadata::lib_groups(bs);
                // This build and the baseline alternate which goes first.
                let mut order = vec![(lib, None), (base, args.baseline_bench.as_deref())];
                if run % 2 == 1 {
                    order.reverse();
                }
                for (group, exe) in order {
                    if group.contains("baseline") && exe.is_none() {
                        continue;
                    }
                    let t = Instant::now();
                    let sample = run_child_of(exe, &args, "library", bs, args.data_mib, &[], &[])?;
                    eprintln!("  {group}: {:.1} s", t.elapsed().as_secs_f64());
                    results.borrow_mut().entry(group).or_default().push(sample);
                }
            }
        }
        if only("remote") {
            remote::run_all(&args, run, &results)?;
        }
        if only("plain") {
            for bs in plain::BLOCK_SIZES {
                child(plain::group(bs), "plain", bs, args.data_mib.max(64))?;
            }
        }
        if only("format") {
            for content in format::CONTENTS {
                for spec in &args.format_configs {
                    child_with(
                        format::group(spec, content),
                        "library",
                        args.block_size,
                        args.format_mib,
                        &["--format", spec, "--content", content],
                    )?;
                }
            }
        }
    }
    // The metadata workload deletes hundreds of thousands of files; on this kind of disk
    // (ext4 mounted with online discard) creating files stays slow for a while after that,
    // which would land on whichever configuration came next (the small blocks, one file
    // each, but not their reference, a few large files). So its runs come after all others.
    let metadata_runs = if all { args.runs } else { 0 };
    for run in 0..metadata_runs {
        eprintln!("metadata run {}/{}", run + 1, args.runs);
        child("metadata".into(), "metadata", 4096, args.data_mib)?;
    }
    eprintln!("benchmark took {:.0} s", started.elapsed().as_secs_f64());
    let mut results = results.into_inner();
    format::add_ratios(&mut results);
    metadata::add_ratios(&mut results, &args.block_sizes);
    daemon::add_ratios(&mut results, args.daemon_block_size);
    remote::add_ratios(&mut results, args.block_size);
    let stats: BTreeMap<String, BTreeMap<String, Stat>> =
        results.iter().map(|(k, v)| (k.clone(), stats(v))).collect();
    if all {
        print_table(&args, &stats);
    }
    if only("daemon") {
        daemon::print(&args, &stats);
    }
    if only("patch") {
        patch::print(&args, &stats);
    }
    if only("remote") {
        remote::print(&args, &stats);
    }
    if only("plain") {
        plain::print(&args, &stats);
    }
    if only("format") {
        format::print(&args, &stats);
    }
    if only("metadata") && !all {
        metadata::print(&args, &stats);
    }
    std::fs::create_dir_all(&args.out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = match &args.only {
        None => args.out.join(format!("run-{stamp}.json")),
        Some(only) => args.out.join(format!("run-{stamp}-{only}.json")),
    };
    let report = serde_json::json!({
        "only": args.only,
        "data_mib": args.data_mib,
        "daemon_data_mib": args.daemon_data_mib,
        "daemon_block_size": args.daemon_block_size,
        "s3_unsigned_payload": s3_unsigned_payload(),
        "runs": args.runs,
        "dup": args.dup,
        "meta_blocks": args.meta_blocks,
        "block_size": args.block_size,
        "format_mib": args.format_mib,
        "format_configs": args.format_configs,
        "ship_files": args.ship_files,
        "baseline_bench": args.baseline_bench.is_some(),
        "results": stats,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    let svg = path.with_extension("svg");
    chart::draw(&args, &stats, &svg)?;
    // The chart of a whole run only: README shows it.
    if all {
        std::fs::copy(&svg, args.out.join("latest.svg"))?;
    }
    // The chart shows the library and daemon workloads: a run without them draws none.
    if svg.exists() {
        println!(
            "\nresults written to {} and {}",
            path.display(),
            svg.display()
        );
    } else {
        println!("\nresults written to {}", path.display());
    }
    Ok(())
}

/// The library run that the daemon is compared with: the same block size and data.
fn daemon_library_group(args: &Args) -> String {
    let dl = label(args.daemon_block_size);
    if args.daemon_data_mib == args.data_mib * args.rss_factor {
        format!("library-x{}/{dl}", args.rss_factor)
    } else {
        format!("library-daemon/{dl}")
    }
}

fn print_table(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let get = |group: &str, key: &str| stats.get(group).and_then(|g| g.get(key));
    let fmt_places = |s: Option<&Stat>, places: usize| {
        s.map_or("-".to_owned(), |s| {
            format!(
                "{:8.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        })
    };
    let fmt = |s: Option<&Stat>| fmt_places(s, 1);
    let fmt_cpu = |s: Option<&Stat>| fmt_places(s, 2).trim().to_owned();
    let ratio = |a: Option<&Stat>, b: Option<&Stat>| match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:5.2}x", a.median / b.median),
        _ => "-".to_owned(),
    };
    println!(
        "\nblockcache bench: {} MiB per configuration, {:.0}% duplicate blocks, median of {} runs (min-max)",
        args.data_mib,
        args.dup * 100.0,
        args.runs
    );
    println!("block    phase                                   MiB/s      ratio  reference");
    for &bs in &args.block_sizes {
        let l = label(bs);
        let lib = format!("library/{l}");
        let rf = format!("reference/{l}");
        let rows = [
            ("write+sync", "write_mib_s", "copy_sync_mib_s", "copy+fsync"),
            ("flush", "flush_mib_s", "copy_sync_mib_s", "copy+fsync"),
            (
                "write+flush",
                "write_flush_mib_s",
                "copy_sync_mib_s",
                "copy+fsync",
            ),
            (
                "cold read",
                "cold_read_mib_s",
                "copy_sync_mib_s",
                "copy+fsync",
            ),
            ("hot read", "hot_read_mib_s", "read_back_mib_s", "read back"),
            ("remove", "remove_mib_s", "copy_sync_mib_s", "copy+fsync"),
        ];
        for (name, key, rkey, rname) in rows {
            println!(
                "{:<8} {:<16} {:>28} {:>10}  {} {}",
                l,
                name,
                fmt(get(&lib, key)),
                ratio(get(&lib, key), get(&rf, rkey)),
                rname,
                fmt(get(&rf, rkey)).trim()
            );
        }
        let stored = get(&lib, "stored_bytes").map_or(0.0, |s| s.median);
        let unique = get(&lib, "unique_bytes").map_or(0.0, |s| s.median);
        let rss = get(&lib, "peak_rss_bytes").map_or(0.0, |s| s.max);
        println!(
            "{:<8} stored {:.1} MiB for {:.1} MiB unique ({:+.2}%), peak RSS {:.1} MiB",
            l,
            stored / MIB,
            unique / MIB,
            (stored / unique.max(1.0) - 1.0) * 100.0,
            rss / MIB
        );
    }
    let dl = label(args.daemon_block_size);
    let lib = format!("library/{dl}");
    let rf = format!("reference/{dl}");
    let dlib = daemon_library_group(args);
    println!(
        "{:<8} daemon workload: {} MiB; the library on the same data: write+flush {}, {} CPU s",
        dl,
        args.daemon_data_mib,
        fmt(get(&dlib, "write_flush_mib_s")).trim(),
        fmt_cpu(get(&dlib, "write_flush_cpu_s")),
    );
    for n in [1, 8] {
        let g = format!("daemon{n}/{dl}");
        println!(
            "{:<8} daemon, {n} client{}: write+flush {} = {} library write+flush, {} copy+fsync, {} CPU s with the client's; cold read {} ({} copy+fsync); hot read {} ({} read back); daemon peak RSS {:.1} MiB ({:.1} MiB after write+flush)",
            dl,
            if n == 1 { "" } else { "s" },
            fmt(get(&g, "write_flush_mib_s")).trim(),
            ratio(
                get(&g, "write_flush_mib_s"),
                get(&dlib, "write_flush_mib_s")
            )
            .trim(),
            ratio(get(&g, "write_flush_mib_s"), get(&rf, "copy_sync_mib_s")).trim(),
            fmt_cpu(get(&g, "write_flush_cpu_s")),
            fmt(get(&g, "cold_read_mib_s")).trim(),
            ratio(get(&g, "cold_read_mib_s"), get(&rf, "copy_sync_mib_s")).trim(),
            fmt(get(&g, "hot_read_mib_s")).trim(),
            ratio(get(&g, "hot_read_mib_s"), get(&rf, "read_back_mib_s")).trim(),
            get(&g, "peak_rss_bytes").map_or(0.0, |s| s.max) / MIB,
            get(&g, "write_peak_rss_bytes").map_or(0.0, |s| s.max) / MIB,
        );
    }
    let big = format!("library-x{}/{dl}", args.rss_factor);
    println!(
        "{:<8} peak RSS: {:.1} MiB with {} MiB of data, {:.1} MiB with {} MiB (bound: 64 MiB + uploads in flight, at most 64 MiB of blocks, + 8 queued blocks = {:.0} MiB)",
        dl,
        get(&lib, "peak_rss_bytes").map_or(0.0, |s| s.max) / MIB,
        args.data_mib,
        get(&big, "peak_rss_bytes").map_or(0.0, |s| s.max) / MIB,
        args.data_mib * args.rss_factor,
        64.0 + (64.0 * args.daemon_block_size as f64 / MIB).min(64.0)
            + 8.0 * args.daemon_block_size as f64 / MIB,
    );
    let sha1 = stats.values().find_map(|g| g.get("sha256_1core_mib_s"));
    let shan = stats.values().find_map(|g| g.get("sha256_all_cores_mib_s"));
    println!(
        "reference SHA-256: 1 core {}  all cores {}",
        fmt(sha1).trim(),
        fmt(shan).trim()
    );
    println!(
        "metadata, unique 4 KiB blocks: commits/s until uploaded {}  commit() alone {}  removes/s {}",
        fmt(get("metadata", "commits_per_s")).trim(),
        fmt(get("metadata", "commit_only_per_s")).trim(),
        fmt(get("metadata", "removes_per_s")).trim()
    );
    let files = get("metadata", "small_files_per_s");
    let unique = get("metadata", "commits_per_s");
    println!(
        "  reference: 4 KiB files created and synced/s {}  unique commits against it {}",
        fmt(files).trim(),
        match (unique, files) {
            (Some(u), Some(f)) if f.median > 0.0 => format!("{:.2}x", u.median / f.median),
            _ => "-".into(),
        }
    );
    println!(
        "metadata, duplicate 4 KiB blocks (no uploads): commits/s {}  removes/s {}",
        fmt(get("metadata", "dup_commits_per_s")).trim(),
        fmt(get("metadata", "dup_removes_per_s")).trim()
    );
}
