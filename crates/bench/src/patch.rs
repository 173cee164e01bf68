//! The patch workload: changes in place of files that are already written, stored and
//! cached, through [`blockcache::Namespace`] (the library, as the daemon uses it) or through
//! the daemon's HTTP API (`PATCH`, `POST ?truncate=`). Each phase is measured against a
//! reference on plain files of the same disk, in the same child process.
//!
//! The files: 8 MiB each, `--data-mib` in all (4 files by default), written with `local`
//! durability, then flushed to the store before each phase, so that each phase starts from
//! clean cached blocks whose objects are in the store. One writer. A phase alternates
//! [`SLICES`] slices of [`SLICE`] of blockcache with as many of its reference, so that both
//! meet the same load of a shared disk; its operations are drawn from a fixed seed (the same
//! sequence for blockcache and for its reference). Phases:
//! - 4 KiB patches at random unaligned offsets, `local` durability, per second; reference:
//!   `pwrite` of 4 KiB + `fdatasync`;
//! - block-sized patches at random block-aligned offsets, `local`, MiB/s; reference: `pwrite`
//!   of a block + `fdatasync`;
//! - truncations, `local`: a shrink by 1 byte to 2 blocks, then a grow back to 8 MiB, each a
//!   truncation, per second; reference: `ftruncate` + `fdatasync`. Between the pairs the cut
//!   bytes are patched back, untimed, so every shrink cuts data;
//! - 4 KiB patches as above with `none` durability; reference: `pwrite` of 4 KiB alone.
//!
//! Each figure is stored with its reference (`ref_` + its name) and their ratio in that run
//! (`_ratio`). The content of the files is checked against a model after each phase, untimed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blockcache::{Durability, Namespace};

use crate::daemon::{self, check};
use crate::{Args, Error, FILE_BYTES, MIB, Sample, Stat, fill, label, open};

/// Each side of a phase runs [`SLICES`] slices of [`SLICE`] (each of at least
/// [`MIN_SLICE_OPS`] operations), alternating with the other side.
const SLICE: Duration = Duration::from_millis(250);
const SLICES: u32 = 8;
const MIN_SLICE_OPS: u64 = 2;
/// The seed of every phase's sequence of operations.
const SEED: u64 = 0x0b10_c0ca_c4e0_0012;
/// The size of the small patches.
const SMALL: u64 = 4096;

#[derive(Debug, Clone, Copy)]
enum Phase {
    SmallLocal,
    BlockLocal,
    Truncate,
    SmallNone,
}

const PHASES: [Phase; 4] = [
    Phase::SmallLocal,
    Phase::BlockLocal,
    Phase::Truncate,
    Phase::SmallNone,
];

impl Phase {
    /// The name of the phase's figure; its reference is `ref_` + this.
    fn key(self) -> &'static str {
        match self {
            Self::SmallLocal => "patch_4k_local_per_s",
            Self::BlockLocal => "patch_block_local_mib_s",
            Self::Truncate => "truncate_local_per_s",
            Self::SmallNone => "patch_4k_none_per_s",
        }
    }

    /// The key of the ratio of the phase's figure to its reference, in one run.
    fn ratio_key(self) -> String {
        let key = self.key();
        let stem = key
            .strip_suffix("_per_s")
            .or_else(|| key.strip_suffix("_mib_s"))
            .unwrap_or(key);
        format!("{stem}_ratio")
    }

    fn durability(self) -> Durability {
        match self {
            Self::SmallNone => Durability::None,
            _ => Durability::Local,
        }
    }

    /// What the phase does, and what its reference does, for the summary.
    fn describe(self, bs: u64) -> (String, String) {
        let block = label(bs);
        match self {
            Self::SmallLocal => ("4K patch, local".into(), "pwrite 4K + fdatasync".into()),
            Self::BlockLocal => (
                format!("{block} patch, local"),
                format!("pwrite {block} + fdatasync"),
            ),
            Self::Truncate => ("truncate, local".into(), "ftruncate + fdatasync".into()),
            Self::SmallNone => ("4K patch, none".into(), "pwrite 4K".into()),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::BlockLocal => "MiB/s",
            _ => "/s",
        }
    }
}

/// One step of a phase.
enum Op {
    /// Writes `len` bytes generated from `seed` at `offset` of `file`.
    Patch {
        file: usize,
        offset: u64,
        len: u64,
        seed: u64,
    },
    /// Shrinks `file` to `size`, then grows it back to [`FILE_BYTES`].
    Truncate { file: usize, size: u64 },
}

/// xorshift64, seeded: the phases' random choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The endless sequence of operations of `phase` over `files` files.
fn ops(phase: Phase, files: usize, bs: u64) -> impl Iterator<Item = Op> {
    let mut rng = Rng::new(SEED ^ phase as u64);
    (0u64..).map(move |i| {
        let file = rng.below(files as u64) as usize;
        let seed = (phase as u64) << 48 | i;
        match phase {
            Phase::SmallLocal | Phase::SmallNone => Op::Patch {
                file,
                offset: rng.below(FILE_BYTES - SMALL + 1),
                len: SMALL,
                seed,
            },
            Phase::BlockLocal => Op::Patch {
                file,
                offset: rng.below(FILE_BYTES / bs) * bs,
                len: bs,
                seed,
            },
            Phase::Truncate => Op::Truncate {
                file,
                size: FILE_BYTES - 1 - rng.below(2 * bs),
            },
        }
    })
}

/// The daemon's address and a client for it.
struct Http {
    client: reqwest::Client,
    base: String,
}

/// Where a phase runs.
enum Side<'a> {
    /// Plain files on the same disk: `pwrite`, `ftruncate`, `fdatasync`.
    Reference(&'a [File]),
    Library(&'a Namespace),
    Daemon(&'a Http),
}

fn name(file: usize) -> String {
    format!("bench/{file}")
}

impl Side<'_> {
    async fn patch(
        &self,
        file: usize,
        offset: u64,
        data: &[u8],
        d: Durability,
    ) -> Result<(), Error> {
        match self {
            Self::Reference(files) => {
                files[file].write_all_at(data, offset)?;
                if d != Durability::None {
                    files[file].sync_data()?;
                }
            }
            Self::Library(ns) => {
                // As the daemon's PATCH does.
                let mut w = ns.patch(&name(file), offset).await?;
                if d != Durability::None {
                    w.write_behind();
                }
                w.write(data).await?;
                w.finish(d).await?;
            }
            Self::Daemon(h) => {
                let url = format!(
                    "{}/v1/files/{}?offset={offset}&durability={d}",
                    h.base,
                    name(file)
                );
                let r = h.client.patch(url).body(data.to_vec()).send().await?;
                check(r, "PATCH").await?;
            }
        }
        Ok(())
    }

    async fn truncate(&self, file: usize, size: u64, d: Durability) -> Result<(), Error> {
        match self {
            Self::Reference(files) => {
                files[file].set_len(size)?;
                if d != Durability::None {
                    files[file].sync_data()?;
                }
            }
            Self::Library(ns) => {
                ns.truncate(&name(file), size, d).await?;
            }
            Self::Daemon(h) => {
                let url = format!(
                    "{}/v1/files/{}?truncate={size}&durability={d}",
                    h.base,
                    name(file)
                );
                check(h.client.post(url).send().await?, "truncate").await?;
            }
        }
        Ok(())
    }

    /// Puts everything written so far in the store (on disk, for the reference).
    async fn settle(&self) -> Result<(), Error> {
        match self {
            Self::Reference(files) => {
                for f in *files {
                    f.sync_data()?;
                }
            }
            Self::Library(ns) => ns.flush().await?,
            Self::Daemon(h) => {
                check(
                    h.client.post(format!("{}/v1/flush", h.base)).send().await?,
                    "flush",
                )
                .await?;
            }
        }
        Ok(())
    }

    /// The whole content of `file`.
    async fn read(&self, file: usize, bs: u64) -> Result<Vec<u8>, Error> {
        Ok(match self {
            Self::Reference(files) => {
                let mut buf = vec![0; files[file].metadata()?.len() as usize];
                files[file].read_exact_at(&mut buf, 0)?;
                buf
            }
            Self::Library(ns) => {
                let r = ns.open_read(&name(file)).await?;
                let mut buf = Vec::with_capacity(r.meta().size as usize);
                while (buf.len() as u64) < r.meta().size {
                    buf.extend_from_slice(&r.read(buf.len() as u64, bs as usize).await?);
                }
                buf
            }
            Self::Daemon(h) => {
                let url = format!("{}/v1/files/{}", h.base, name(file));
                check(h.client.get(url).send().await?, "GET")
                    .await?
                    .bytes()
                    .await?
                    .to_vec()
            }
        })
    }

    /// Checks every file against `model`.
    async fn verify(&self, model: &[Vec<u8>], bs: u64, phase: Phase) -> Result<(), Error> {
        for (file, want) in model.iter().enumerate() {
            if self.read(file, bs).await? != *want {
                return Err(format!("file {file} differs from its model after {phase:?}").into());
            }
        }
        Ok(())
    }
}

/// One side of a phase under way: its next operations and what it did so far.
struct Run {
    ops: Box<dyn Iterator<Item = Op>>,
    done: u64,
    /// The time the operations took (without the untimed restores).
    busy: Duration,
}

impl Run {
    fn new(phase: Phase, files: usize, bs: u64) -> Self {
        Self {
            ops: Box::new(ops(phase, files, bs)),
            done: 0,
            busy: Duration::ZERO,
        }
    }

    /// Runs the next operations of `phase` on `side` for a [`SLICE`] (and at least
    /// [`MIN_SLICE_OPS`]), applying them to `model` too.
    async fn slice(
        &mut self,
        side: &Side<'_>,
        phase: Phase,
        model: &mut [Vec<u8>],
    ) -> Result<(), Error> {
        let d = phase.durability();
        let mut buf = Vec::new();
        let start = Instant::now();
        let mut n = 0;
        while n < MIN_SLICE_OPS || start.elapsed() < SLICE {
            match self.ops.next().expect("the operations never end") {
                Op::Patch {
                    file,
                    offset,
                    len,
                    seed,
                } => {
                    buf.resize(len as usize, 0);
                    fill(&mut buf, seed);
                    let t = Instant::now();
                    side.patch(file, offset, &buf, d).await?;
                    self.busy += t.elapsed();
                    n += 1;
                    model[file][offset as usize..][..len as usize].copy_from_slice(&buf);
                }
                Op::Truncate { file, size } => {
                    let t = Instant::now();
                    side.truncate(file, size, d).await?;
                    side.truncate(file, FILE_BYTES, d).await?;
                    self.busy += t.elapsed();
                    n += 2;
                    // The cut bytes back (untimed), so that the next shrink cuts data again.
                    side.patch(file, size, &model[file][size as usize..], d)
                        .await?;
                }
            }
        }
        self.done += n;
        Ok(())
    }

    /// Operations per second, or MiB/s for the block-sized patches.
    fn rate(&self, phase: Phase, bs: u64) -> f64 {
        let per_s = self.done as f64 / self.busy.as_secs_f64();
        match phase {
            Phase::BlockLocal => per_s * bs as f64 / MIB,
            _ => per_s,
        }
    }
}

/// Runs every phase on `side` and on the reference, in alternating slices; returns their
/// figures.
async fn phases(
    side: &Side<'_>,
    reference: &[File],
    model: Vec<Vec<u8>>,
    bs: u64,
) -> Result<Sample, Error> {
    let mut s = Sample::default();
    let refside = Side::Reference(reference);
    let mut ref_model = model.clone();
    let mut model = model;
    for phase in PHASES {
        refside.settle().await?;
        side.settle().await?;
        let mut reference = Run::new(phase, model.len(), bs);
        let mut run = Run::new(phase, model.len(), bs);
        for _ in 0..SLICES {
            reference.slice(&refside, phase, &mut ref_model).await?;
            run.slice(side, phase, &mut model).await?;
        }
        refside.verify(&ref_model, bs, phase).await?;
        side.verify(&model, bs, phase).await?;
        let (figure, reference) = (run.rate(phase, bs), reference.rate(phase, bs));
        s.values.insert(phase.key().into(), figure);
        s.values.insert(format!("ref_{}", phase.key()), reference);
        s.values.insert(phase.ratio_key(), figure / reference);
    }
    Ok(s)
}

/// The files' first content: unique blocks.
fn initial(files: usize, bs: u64) -> Vec<Vec<u8>> {
    (0..files)
        .map(|f| {
            let mut content = vec![0; FILE_BYTES as usize];
            for (b, block) in content.chunks_mut(bs as usize).enumerate() {
                fill(
                    block,
                    (f as u64 * FILE_BYTES.div_ceil(bs) + b as u64) << 1 | 1,
                );
            }
            content
        })
        .collect()
}

/// The reference's files, with `model`'s content, on disk.
fn reference_files(dir: &Path, model: &[Vec<u8>]) -> Result<Vec<File>, Error> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for (i, content) in model.iter().enumerate() {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(i.to_string()))?;
        f.write_all_at(content, 0)?;
        f.sync_all()?;
        files.push(f);
    }
    File::open(dir)?.sync_all()?;
    Ok(files)
}

fn file_count(args: &Args) -> usize {
    (args.data_mib << 20).div_ceil(FILE_BYTES) as usize
}

/// The patch workload through the library.
pub async fn library(args: &Args) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("patch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bs = args.block_size;
    let model = initial(file_count(args), bs);
    let logical = model.len() as u64 * FILE_BYTES;
    let ns = Namespace::open(
        open(&dir.join("lib"), bs, 4 * logical + (64 << 20)).await?,
        1 << 40,
    )
    .await?;
    for (file, content) in model.iter().enumerate() {
        let mut w = ns.create(&name(file)).await?;
        w.write_behind();
        w.write(content).await?;
        w.finish(Durability::Local).await?;
    }
    let reference = reference_files(&dir.join("ref"), &model)?;
    let s = phases(&Side::Library(&ns), &reference, model, bs).await?;
    ns.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// The patch workload through the daemon, one client.
pub async fn daemon(args: &Args) -> Result<Sample, Error> {
    let dir = args
        .dir
        .join(format!("patch-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bs = args.block_size;
    let model = initial(file_count(args), bs);
    let logical = model.len() as u64 * FILE_BYTES;
    let d = daemon::start(&dir.join("daemon"), bs, 4 * logical + (64 << 20))?;
    let http = Http {
        client: reqwest::Client::new(),
        base: d.base.clone(),
    };
    for (file, content) in model.iter().enumerate() {
        let url = format!("{}/v1/files/{}?durability=local", http.base, name(file));
        check(
            http.client.put(url).body(content.clone()).send().await?,
            "PUT",
        )
        .await?;
    }
    let reference = reference_files(&dir.join("ref"), &model)?;
    let s = phases(&Side::Daemon(&http), &reference, model, bs).await?;
    d.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// The summary of the patch workload.
pub fn print(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let bs = args.daemon_block_size;
    let l = label(bs);
    let get = |group: &str, key: &str| stats.get(group).and_then(|g| g.get(key));
    let fmt = |s: Option<&Stat>, places: usize| {
        s.map_or("-".to_owned(), |s| {
            // Small ratios (patches without sync against page-cache writes) keep two
            // significant digits.
            let places = if s.median < 0.1 { places + 2 } else { places };
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        })
    };
    println!(
        "\npatch workload: {} files of 8 MiB at {l} blocks, written, stored and cached; one writer; {} slices of {} ms a phase, alternating with the reference; median of {} runs (min-max); ratios to the reference are per run",
        file_count(args),
        SLICES,
        SLICE.as_millis(),
        args.runs
    );
    println!(
        "side     phase              {:>32} {:>20}  reference",
        "blockcache", "ratio"
    );
    for (side, group) in [
        ("library", format!("patch/{l}")),
        ("daemon", format!("patch-daemon/{l}")),
    ] {
        for phase in PHASES {
            let (what, reference) = phase.describe(bs);
            println!(
                "{side:<8} {what:<18} {:>26} {:<5} {:>20}  {reference} {} {}",
                fmt(get(&group, phase.key()), 1),
                phase.unit(),
                format!("{}x", fmt(get(&group, &phase.ratio_key()), 2)),
                fmt(get(&group, &format!("ref_{}", phase.key())), 1),
                phase.unit(),
            );
        }
    }
    let ratios: Vec<String> = PHASES
        .iter()
        .map(|p| {
            let (what, _) = p.describe(bs);
            let d = get(&format!("patch-daemon/{l}"), p.key());
            let lib = get(&format!("patch/{l}"), p.key());
            match (d, lib) {
                (Some(d), Some(lib)) if lib.median > 0.0 => {
                    format!("{what} {:.2}x", d.median / lib.median)
                }
                _ => format!("{what} -"),
            }
        })
        .collect();
    println!("daemon against the library: {}", ratios.join(", "));
}

/// The chart's bars of the patch workload: (name, ratio to the reference in each run).
pub fn bars<'a>(
    args: &Args,
    stats: &'a BTreeMap<String, BTreeMap<String, Stat>>,
) -> Vec<(String, &'a Stat)> {
    let l = label(args.daemon_block_size);
    let mut out = Vec::new();
    for (side, group) in [
        ("", format!("patch/{l}")),
        (" daemon", format!("patch-daemon/{l}")),
    ] {
        for phase in PHASES {
            if let Some(s) = stats.get(&group).and_then(|g| g.get(&phase.ratio_key())) {
                let (what, _) = phase.describe(args.daemon_block_size);
                out.push((format!("{l}{side} {what}"), s));
            }
        }
    }
    out
}
