//! The remote-store workload (`--only remote`): the engine and its file namespace in front of
//! a real S3 server, s3s-fs (from the Rust crates: it keeps its objects in a directory), run
//! in a process of its own behind a delaying TCP proxy, as a bucket across a network is.
//!
//! Configurations ([`CONFIGS`]): loopback, 20 ms and 100 ms round trips, and 20 ms with the
//! link capped at 400 Mbit/s. The proxy holds each chunk of bytes for half the round trip in
//! each direction and, with a cap, sends the bytes of each direction (all connections
//! together) no faster than the cap: this machine's kernel has no netem.
//!
//! Phases, on `--data-mib` of files (8 files, a fraction `--dup` of their blocks duplicates)
//! through the `Namespace` with the engine's default settings: write + flush (until in the
//! store), cold read by one sequential reader (the files one after another) and by 8 (one
//! file each), after dropping the cache each time, hot read by one reader. Figures are
//! ratios to the loopback configuration of the same run, plus the PUTs and GETs the engine
//! made and the bytes it downloaded against the unique bytes of the data.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockcache::{BlockCache, Config, Durability, Namespace};
use blockcache_backend::Backend;
use blockcache_db::Db;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Args, Error, MIB, Sample, Stat, fill, label, seed_of};

/// The bucket the engine stores into.
const BUCKET: &str = "bench";
const ACCESS_KEY: &str = "blockcache-bench";
const SECRET_KEY: &str = "blockcache-bench-secret";
/// Files written, and readers of the parallel cold read (one file each).
const FILES: u64 = 8;

/// A configuration of the link to the store.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub name: &'static str,
    /// Round-trip time added by the proxy.
    pub rtt_ms: u64,
    /// Bandwidth cap of each direction; 0 for none.
    pub rate_mbit: u64,
}

pub const CONFIGS: [Link; 4] = [
    Link {
        name: "loopback",
        rtt_ms: 0,
        rate_mbit: 0,
    },
    Link {
        name: "20ms",
        rtt_ms: 20,
        rate_mbit: 0,
    },
    Link {
        name: "100ms",
        rtt_ms: 100,
        rate_mbit: 0,
    },
    Link {
        name: "20ms-400mbit",
        rtt_ms: 20,
        rate_mbit: 400,
    },
];

pub fn group(link: &Link, bs: u64) -> String {
    format!("remote-{}/{}", link.name, label(bs))
}

/// Runs the workload once over `link`: starts the S3 server (with its proxy) as a child
/// process, runs the workload in another with the store's settings in its environment, then
/// stops the server and removes its objects.
pub fn run(args: &Args, link: &Link) -> Result<Sample, Error> {
    let root = args
        .dir
        .join(format!("remote-store-{}-{}", std::process::id(), link.name));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join(BUCKET))?;
    let mut server = Command::new(std::env::current_exe()?)
        .args([
            "--child",
            "s3-server",
            "--dir",
            &root.display().to_string(),
            "--rtt-ms",
            &link.rtt_ms.to_string(),
            "--rate-mbit",
            &link.rate_mbit.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| {
        let stdout = server.stdout.take().ok_or("the server has no stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let port: u16 = line
            .trim()
            .parse()
            .map_err(|e| format!("the S3 server did not start ({line:?}): {e}"))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        crate::run_child_of(
            None,
            args,
            "remote",
            args.block_size,
            args.data_mib,
            &[],
            &[
                ("AWS_ENDPOINT", endpoint.as_str()),
                ("AWS_ALLOW_HTTP", "true"),
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                ("AWS_REGION", "us-east-1"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
            ],
        )
    })();
    // Closing its standard input stops the server.
    drop(server.stdin.take());
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// The child `s3-server`: s3s-fs on the directory `--dir`, behind the proxy, whose port it
/// prints; it runs until its standard input closes.
pub fn server(args: &Args) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let fs = s3s_fs::FileSystem::new(&args.dir).map_err(|e| format!("s3s-fs: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let s3 = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = s3.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = s3.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", proxy.local_addr()?.port());
        let delay = Duration::from_millis(args.rtt_ms) / 2;
        let rate = (args.rate_mbit > 0).then(|| args.rate_mbit as f64 * 1e6 / 8.0);
        tokio::spawn(delaying_proxy(proxy, upstream, delay, rate));
        // Until the parent closes standard input.
        let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed.send(());
        });
        let _ = stdin_closed.await;
        Ok(())
    })
}

/// When the bytes of one direction of the link are free to go (all connections share it).
#[derive(Clone)]
struct Wire {
    /// Bytes per second; `None`: no cap.
    rate: Option<f64>,
    free_at: Arc<Mutex<tokio::time::Instant>>,
}

impl Wire {
    fn new(rate: Option<f64>) -> Self {
        Self {
            rate,
            free_at: Arc::new(Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// When `n` bytes read now are through the wire (before the propagation delay).
    fn sent(&self, n: usize) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let Some(rate) = self.rate else {
            return now;
        };
        let mut free_at = self.free_at.lock().expect("wire poisoned");
        let start = (*free_at).max(now);
        *free_at = start + Duration::from_secs_f64(n as f64 / rate);
        *free_at
    }
}

/// Forwards every connection to `upstream`, each direction's bytes `delay` late and no
/// faster than `rate` bytes per second over all connections.
async fn delaying_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
    delay: Duration,
    rate: Option<f64>,
) {
    let (up_wire, down_wire) = (Wire::new(rate), Wire::new(rate));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (up_wire, down_wire) = (up_wire.clone(), down_wire.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, delay, up_wire), pipe(sr, cw, delay, down_wire));
        });
    }
}

/// One direction of a proxied connection: what is read is written `delay` after it is
/// through the wire. At most 256 chunks (of up to 64 KiB) are in flight; beyond that the
/// reading waits, and TCP's flow control reaches the sender.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    wire: Wire,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Bytes)>(256);
    let reading = async move {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(64 << 10);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let chunk = buf.split().freeze();
            let at = wire.sent(chunk.len()) + delay;
            if tx.send((at, chunk)).await.is_err() {
                break;
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}

/// The child `remote`: the workload against the store its environment names.
pub async fn remote(args: &Args) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("remote-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bs = args.block_size;
    let blocks_per_file = ((args.data_mib << 20) / FILES).div_ceil(bs).max(1);
    let logical = FILES * blocks_per_file * bs;
    let dup = args.dup;
    let mut unique = std::collections::HashSet::new();
    for g in 0..FILES * blocks_per_file {
        unique.insert(seed_of(g, dup));
    }
    let unique_bytes = unique.len() as u64 * bs;

    // The engine's defaults, but for the room the data needs.
    let mut config = Config::new(dir.join("cache"));
    config.block_size = bs;
    config.max_bytes = config.max_bytes.max(2 * logical + (64 << 20));
    let db = Db::open(dir.join("meta.db").to_str().ok_or("path not UTF-8")?).await?;
    let backend = Backend::open(&format!("s3://{BUCKET}"), Duration::from_secs(60))?;
    let cache = BlockCache::open(config, db, backend).await?;
    let ns = Arc::new(Namespace::open(cache, u64::MAX).await?);

    let mut s = Sample::default();
    let mut put = |k: &str, v: f64| {
        s.values.insert(k.to_owned(), v);
    };
    let mib_s = |t: Duration| logical as f64 / MIB / t.as_secs_f64();
    let name = |f: u64| format!("f{f}");
    let before = ns.cache().usage().await?;

    let start = Instant::now();
    let mut tasks = Vec::new();
    for f in 0..FILES {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = ns.create(&name(f)).await?;
            let mut buf = vec![0; bs as usize];
            for b in 0..blocks_per_file {
                fill(&mut buf, seed_of(f * blocks_per_file + b, dup));
                w.write(&buf).await?;
            }
            w.finish(Durability::default()).await?;
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let write = start.elapsed();
    let shipped = ns.cache().metadata_status().await?.ship_time;
    let start = Instant::now();
    ns.flush().await?;
    let flush = start.elapsed();
    // The part of the flush that shipped the metadata (its requests come after the blocks').
    let ship = ns.cache().metadata_status().await?.ship_time - shipped;
    put("flush_ship_s", ship.as_secs_f64());
    put("flush_s", flush.as_secs_f64());
    put("write_mib_s", mib_s(write));
    put("flush_mib_s", mib_s(flush));
    put("write_flush_mib_s", mib_s(write + flush));
    let written = ns.cache().usage().await?;
    put("puts", (written.uploads - before.uploads) as f64);
    put(
        "put_bytes",
        (written.upload_bytes - before.upload_bytes) as f64,
    );
    put("unique_bytes", unique_bytes as f64);
    put("logical_bytes", logical as f64);

    // Cold reads: one reader, the files one after another; then 8, one file each.
    for (readers, key) in [(1, "cold1"), (FILES, "cold8")] {
        ns.cache().clear().await?;
        let before = ns.cache().usage().await?;
        let start = Instant::now();
        read_all(&ns, readers).await?;
        put(&format!("{key}_mib_s"), mib_s(start.elapsed()));
        let after = ns.cache().usage().await?;
        put(
            &format!("{key}_gets"),
            (after.downloads - before.downloads) as f64,
        );
        put(
            &format!("{key}_egress_bytes"),
            (after.download_bytes - before.download_bytes) as f64,
        );
    }
    let start = Instant::now();
    read_all(&ns, 1).await?;
    put("hot_mib_s", mib_s(start.elapsed()));

    // Check every byte once, outside the timed phases.
    let mut want = vec![0; bs as usize];
    for f in 0..FILES {
        let r = ns.open_read(&name(f)).await?;
        for b in 0..blocks_per_file {
            fill(&mut want, seed_of(f * blocks_per_file + b, dup));
            if r.read(b * bs, bs as usize).await?[..] != want[..] {
                return Err(format!("block {b} of file {f} read back wrong").into());
            }
        }
    }
    put(
        "peak_rss_bytes",
        crate::peak_rss_of(std::process::id()) as f64,
    );
    Arc::into_inner(ns)
        .ok_or("namespace still shared")?
        .shutdown()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// Reads every file to its end through `FileReader`'s `AsyncRead`, with `readers` tasks
/// taking the files in turn.
async fn read_all(ns: &Arc<Namespace>, readers: u64) -> Result<(), Error> {
    let mut tasks = Vec::new();
    for t in 0..readers {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut f = t;
            while f < FILES {
                let mut r = ns.open_read(&format!("f{f}")).await?;
                let size = r.meta().size;
                let n = tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
                if n != size {
                    return Err(format!("file {f}: {n} bytes read of {size}").into());
                }
                f += readers;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The phases with a throughput, and their names in the table.
const PHASES: [(&str, &str); 5] = [
    ("write_flush_mib_s", "write+flush"),
    ("flush_mib_s", "flush"),
    ("cold1_mib_s", "cold read, 1"),
    ("cold8_mib_s", "cold read, 8"),
    ("hot_mib_s", "hot read"),
];

/// Adds to each sample its ratios to the loopback sample of the same run, and its cold
/// reads' egress against the unique bytes.
pub fn add_ratios(results: &mut BTreeMap<String, Vec<Sample>>, bs: u64) {
    let Some(base) = results.get(&group(&CONFIGS[0], bs)).cloned() else {
        return;
    };
    for link in &CONFIGS {
        let Some(samples) = results.get_mut(&group(link, bs)) else {
            continue;
        };
        for (sample, base) in samples.iter_mut().zip(&base) {
            for (key, _) in PHASES {
                if let (Some(v), Some(b)) = (sample.values.get(key), base.values.get(key))
                    && *b > 0.0
                {
                    let ratio = v / b;
                    sample.values.insert(format!("{key}_vs_loopback"), ratio);
                }
            }
            for cold in ["cold1", "cold8"] {
                if let (Some(e), Some(u)) = (
                    sample.values.get(&format!("{cold}_egress_bytes")),
                    sample.values.get("unique_bytes"),
                ) && *u > 0.0
                {
                    let ratio = e / u;
                    sample
                        .values
                        .insert(format!("{cold}_egress_vs_unique"), ratio);
                }
            }
        }
    }
}

/// The table: each configuration's phases (MiB/s and ratio to loopback), requests, egress.
pub fn print(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let bs = args.block_size;
    println!(
        "\nremote store (s3s-fs behind a delaying proxy), engine defaults: {} MiB in {FILES} files at {} blocks, {:.0}% duplicate blocks, median of {} runs (min-max); ratios to loopback taken run by run",
        args.data_mib,
        label(bs),
        args.dup * 100.0,
        args.runs
    );
    println!(
        "{:<14} {:<14} {:>24} {:>20}",
        "link", "phase", "MiB/s", "/ loopback"
    );
    for link in &CONFIGS {
        let Some(g) = stats.get(&group(link, bs)) else {
            continue;
        };
        let fmt = |s: &Stat, places: usize| {
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        };
        for (key, name) in PHASES {
            let Some(v) = g.get(key) else { continue };
            let ratio = g
                .get(&format!("{key}_vs_loopback"))
                .map_or("-".to_owned(), |r| {
                    format!("{:.2}x ({:.2}-{:.2})", r.median, r.min, r.max)
                });
            println!(
                "{:<14} {:<14} {:>24} {:>20}",
                link.name,
                name,
                fmt(v, 1),
                ratio
            );
        }
        let med = |k: &str| g.get(k).map_or(0.0, |s| s.median);
        println!(
            "{:<14} {:<14} PUTs {:.0}, GETs {:.0} (1 reader) and {:.0} (8), egress / unique bytes {:.2} (1 reader) and {:.2} (8), peak RSS {:.0} MiB",
            link.name,
            "requests",
            med("puts"),
            med("cold1_gets"),
            med("cold8_gets"),
            med("cold1_egress_vs_unique"),
            med("cold8_egress_vs_unique"),
            med("peak_rss_bytes") / MIB,
        );
    }
}

/// Runs every configuration once, in an order that alternates between runs.
pub fn run_all(
    args: &Args,
    round: usize,
    results: &RefCell<BTreeMap<String, Vec<Sample>>>,
) -> Result<(), Error> {
    let mut links: Vec<Link> = CONFIGS
        .iter()
        .filter(|l| l.rtt_ms == 0 && l.rate_mbit == 0 || args.links.iter().any(|n| n == l.name))
        .copied()
        .collect();
    if round % 2 == 1 {
        links.reverse();
    }
    for link in links {
        let t = Instant::now();
        let sample = run(args, &link)?;
        let g = group(&link, args.block_size);
        eprintln!("  {g}: {:.1} s", t.elapsed().as_secs_f64());
        results.borrow_mut().entry(g).or_default().push(sample);
    }
    Ok(())
}
