//! The daemon workload: the release `blockcache` binary started on a free port with a fresh
//! data directory, and the library workload's files sent through its HTTP API by N concurrent
//! clients (reqwest, streaming bodies generated block by block), or through its S3 endpoint
//! ([`Api::S3`]: object_store's S3 client, PutObject and GetObject of the same files).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};

use crate::{
    Args, Error, FILE_BYTES, MIB, Sample, Spares, Stat, cpu_of, fill, label, peak_rss_of, seed_of,
};

/// A running daemon, killed if dropped before [`Daemon::stop`].
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The S3 endpoint's `http://127.0.0.1:PORT`, if it was started ([`start_s3`]).
    pub s3: Option<String>,
    /// The daemon's standard output, kept open: a daemon that prints to a closed pipe
    /// panics.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon with SIGTERM (it flushes, then exits) and checks that it exited 0.
    pub fn stop(mut self) -> Result<(), Error> {
        let stop = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !stop.success() {
            return Err("could not stop the daemon".into());
        }
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("the daemon exited with {status}").into());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("blockcache");
    if !bin.exists() {
        return Err(format!(
            "no daemon binary at {}; build it with `cargo build --release --bin blockcache` (cargo xtask bench does)",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// Starts the release daemon on a free port with its data under `dir`, no background
/// uploads (`--upload-delay off`) and no S3 endpoint.
pub fn start(dir: &std::path::Path, block_size: u64, cache_bytes: u64) -> Result<Daemon, Error> {
    spawn(dir, block_size, cache_bytes, false, true)
}

/// [`start`] with the default upload delay (background uploads of blocks 10 s old).
pub fn start_defaults(
    dir: &std::path::Path,
    block_size: u64,
    cache_bytes: u64,
) -> Result<Daemon, Error> {
    spawn(dir, block_size, cache_bytes, false, false)
}

/// The access key of the S3 endpoint [`start_s3`] starts.
const S3_ACCESS_KEY: &str = "bench";
/// Its secret key.
const S3_SECRET_KEY: &str = "bench-secret";
/// The bucket of the S3 workload: its objects are the files `bench/N`, as the file API's.
const S3_BUCKET: &str = "bench";

/// [`start`], with the S3 endpoint on another free port (with keys: an endpoint without
/// them refuses signed requests).
pub fn start_s3(dir: &std::path::Path, block_size: u64, cache_bytes: u64) -> Result<Daemon, Error> {
    spawn(dir, block_size, cache_bytes, true, true)
}

fn spawn(
    dir: &std::path::Path,
    block_size: u64,
    cache_bytes: u64,
    s3: bool,
    no_background_uploads: bool,
) -> Result<Daemon, Error> {
    use std::io::BufRead;
    let mut cmd = Command::new(binary()?);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    if no_background_uploads {
        cmd.args(["--upload-delay", "off"]);
    }
    cmd
        // A plain volume, as the library workload it is compared with (see `open`).
        .args(["--compression", "none"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--block-size", &block_size.to_string()])
        .args(["--max-cache-size", &cache_bytes.to_string()])
        .args(["--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if s3 {
        cmd.args(["--s3-listen", "127.0.0.1:0"])
            .args(["--s3-access-key", S3_ACCESS_KEY])
            .args(["--s3-secret-key", S3_SECRET_KEY]);
    } else {
        // The endpoint is on by default, on a fixed port that another daemon may hold.
        cmd.args(["--s3-listen", "off"]);
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("blockcache listening on ")
        .ok_or_else(|| format!("the daemon did not start: {line:?}"))?
        .to_owned();
    let s3 = if s3 {
        line.clear();
        stdout.read_line(&mut line)?;
        Some(
            line.trim()
                .strip_prefix("blockcache S3 endpoint on ")
                .ok_or_else(|| format!("the daemon's S3 endpoint did not start: {line:?}"))?
                .to_owned(),
        )
    } else {
        None
    };
    Ok(Daemon {
        child,
        base,
        s3,
        _stdout: stdout,
    })
}

/// An S3 client of `d`'s endpoint for [`S3_BUCKET`], which it creates (CreateBucket: a PUT
/// on the bucket, presigned by the client, since object_store has no call for it).
async fn s3_client(d: &Daemon, http: &reqwest::Client) -> Result<AmazonS3, Error> {
    use object_store::signer::Signer;
    let endpoint = d.s3.as_deref().ok_or("the daemon has no S3 endpoint")?;
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key(S3_SECRET_KEY)
        .with_bucket_name(S3_BUCKET)
        .with_unsigned_payload(crate::s3_unsigned_payload())
        .build()?;
    // The URL of the empty key is the bucket's (`/bench/`).
    let url = store
        .signed_url(
            reqwest::Method::PUT,
            &object_store::path::Path::from(""),
            Duration::from_secs(60),
        )
        .await?;
    check(http.put(url.as_str()).send().await?, "CreateBucket").await?;
    Ok(store)
}

/// `r` if it is a success, else an error with its status and body.
pub async fn check(r: reqwest::Response, what: &str) -> Result<reqwest::Response, Error> {
    if r.status().is_success() {
        Ok(r)
    } else {
        let status = r.status();
        Err(format!(
            "{what}: HTTP {status}: {}",
            r.text().await.unwrap_or_default()
        )
        .into())
    }
}

/// A block being sent; its buffer returns to the spares when the last `Bytes` of it drops.
struct Spare {
    buf: Vec<u8>,
    home: Spares,
}

impl AsRef<[u8]> for Spare {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.buf));
    }
}

/// Runs `job(file)` for every file, with `clients` concurrent workers taking the next file.
async fn each_file<F, Fut>(files: u64, clients: usize, job: F) -> Result<Duration, Error>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let job = Arc::new(job);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, job) = (next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let file = next.fetch_add(1, Ordering::SeqCst);
                if file >= files {
                    return Ok::<_, Error>(());
                }
                job(file).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// The API the daemon workload sends its files through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The file API: `PUT` and `GET /v1/files/bench/N` (reqwest).
    Http,
    /// The S3 endpoint: PutObject and GetObject of `bench/N` (object_store's S3 client).
    S3,
}

/// The file `file`'s blocks as the library workload writes them, generated into buffers of
/// `spares` that go back to it once the last `Bytes` of each is dropped (once sent), so the
/// client does not pay for fresh pages each block.
fn blocks(
    spares: &Spares,
    file: u64,
    blocks_per_file: u64,
    bs: u64,
    dup: f64,
) -> impl Iterator<Item = bytes::Bytes> + use<> {
    let spares = spares.clone();
    (0..blocks_per_file).map(move |blk| {
        let mut buf = spares.take(bs as usize);
        fill(&mut buf, seed_of(file * blocks_per_file + blk, dup));
        bytes::Bytes::from_owner(Spare {
            buf,
            home: spares.clone(),
        })
    })
}

/// Sends file `file` through `api`.
async fn put(
    api: &Client,
    spares: &Spares,
    file: u64,
    blocks_per_file: u64,
    bs: u64,
    dup: f64,
) -> Result<(), Error> {
    let blocks = blocks(spares, file, blocks_per_file, bs, dup);
    match api {
        Client::Http { http, base } => {
            // The body is generated block by block as hyper sends it: no whole file in
            // memory.
            let body = futures::stream::iter(blocks.map(Ok::<_, std::io::Error>));
            let r = http
                .put(format!("{base}/v1/files/bench/{file}"))
                .header(reqwest::header::CONTENT_LENGTH, blocks_per_file * bs)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await?;
            check(r, "PUT").await?;
        }
        Client::S3(store) => {
            // object_store's PutObject takes the whole body (it signs its SHA-256 and may
            // resend it): one file's blocks per client are in memory until it is sent.
            let payload: object_store::PutPayload = blocks.collect();
            store.put(&key(file), payload).await?;
        }
    }
    Ok(())
}

/// Reads file `file` through `api`, as a stream; checks its length.
async fn get(api: &Client, file: u64, bytes: u64) -> Result<(), Error> {
    let mut n = 0u64;
    match api {
        Client::Http { http, base } => {
            let r = check(
                http.get(format!("{base}/v1/files/bench/{file}"))
                    .send()
                    .await?,
                "GET",
            )
            .await?;
            let mut body = r.bytes_stream();
            while let Some(chunk) = body.next().await {
                n += chunk?.len() as u64;
            }
        }
        Client::S3(store) => {
            let mut body = store.get(&key(file)).await?.into_stream();
            while let Some(chunk) = body.next().await {
                n += chunk?.len() as u64;
            }
        }
    }
    if n != bytes {
        return Err(format!("file {file}: {n} bytes").into());
    }
    Ok(())
}

/// The S3 key of file `file` (in [`S3_BUCKET`]).
fn key(file: u64) -> object_store::path::Path {
    object_store::path::Path::from(file.to_string())
}

/// A client of the API being measured.
enum Client {
    Http { http: reqwest::Client, base: String },
    S3(AmazonS3),
}

/// The daemon workload with `clients` concurrent clients through `api`. Flushing, dropping
/// the cache and the stats go through the file API either way.
pub async fn daemon(args: &Args, clients: usize, api: Api) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bs = args.block_size;
    let total = args.data_mib << 20;
    let files = total.div_ceil(FILE_BYTES);
    let blocks_per_file = FILE_BYTES.div_ceil(bs);
    let logical = files * blocks_per_file * bs;
    let cache_bytes = 2 * logical + (64 << 20);
    let d = match api {
        Api::Http => start(&dir, bs, cache_bytes)?,
        Api::S3 => start_s3(&dir, bs, cache_bytes)?,
    };
    let http = reqwest::Client::new();
    let base = d.base.clone();
    let client = Arc::new(match api {
        Api::Http => Client::Http {
            http: http.clone(),
            base: base.clone(),
        },
        Api::S3 => Client::S3(s3_client(&d, &http).await?),
    });
    let dup = args.dup;
    let mut s = Sample::default();
    let mib_s = |t: Duration| logical as f64 / MIB / t.as_secs_f64();

    let c = client.clone();
    let cpu = cpu_of(d.child.id()) + cpu_of(std::process::id());
    let spares = Spares::default();
    let write = each_file(files, clients, move |file| {
        let (c, spares) = (c.clone(), spares.clone());
        async move { put(&c, &spares, file, blocks_per_file, bs, dup).await }
    })
    .await?;
    let started = Instant::now();
    check(http.post(format!("{base}/v1/flush")).send().await?, "flush").await?;
    let flush = started.elapsed();
    // The client's CPU counts too: it shares the machine with the daemon.
    s.values.insert(
        "write_flush_cpu_s".into(),
        cpu_of(d.child.id()) + cpu_of(std::process::id()) - cpu,
    );
    s.values.insert("write_mib_s".into(), mib_s(write));
    s.values.insert("flush_mib_s".into(), mib_s(flush));
    s.values
        .insert("write_flush_mib_s".into(), mib_s(write + flush));
    let stats: serde_json::Value =
        check(http.get(format!("{base}/v1/stats")).send().await?, "stats")
            .await?
            .json()
            .await?;
    s.values.insert(
        "stored_bytes".into(),
        stats["store"]["stored_bytes"].as_f64().unwrap_or(0.0),
    );
    s.values.insert(
        "write_peak_rss_bytes".into(),
        peak_rss_of(d.child.id()) as f64,
    );
    if crate::write_only() {
        return Ok(s);
    }

    check(
        http.post(format!("{base}/v1/cache/drop")).send().await?,
        "drop",
    )
    .await?;
    for phase in ["cold_read_mib_s", "hot_read_mib_s"] {
        let c = client.clone();
        let t = each_file(files, clients, move |file| {
            let c = c.clone();
            async move { get(&c, file, blocks_per_file * bs).await }
        })
        .await?;
        s.values.insert(phase.into(), mib_s(t));
    }
    s.values
        .insert("peak_rss_bytes".into(), peak_rss_of(d.child.id()) as f64);
    d.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

/// The group of the daemon workload with `clients` clients through `api` at block size `bs`.
pub fn group(clients: usize, api: Api, bs: u64) -> String {
    match api {
        Api::Http => format!("daemon{clients}/{}", label(bs)),
        Api::S3 => format!("daemon{clients}-s3/{}", label(bs)),
    }
}

/// The child kind of the daemon workload with `clients` clients through `api`.
pub fn kind(clients: usize, api: Api) -> String {
    match api {
        Api::Http => format!("daemon{clients}"),
        Api::S3 => format!("daemon{clients}-s3"),
    }
}

/// The figures of the S3 workload that are compared with the file API's, and the names of
/// the ratios (S3 / file API, taken run by run: both run one after the other in each run).
const RATIOS: [(&str, &str); 4] = [
    ("write_flush_mib_s", "write_flush_vs_file_api"),
    ("cold_read_mib_s", "cold_read_vs_file_api"),
    ("hot_read_mib_s", "hot_read_vs_file_api"),
    ("write_flush_cpu_s", "write_flush_cpu_vs_file_api"),
];

/// Adds to each sample of the S3 workload its ratios to the file API's sample of the same
/// run and number of clients.
pub fn add_ratios(results: &mut BTreeMap<String, Vec<Sample>>, bs: u64) {
    for clients in CLIENTS {
        let Some(base) = results.get(&group(clients, Api::Http, bs)).cloned() else {
            continue;
        };
        let Some(samples) = results.get_mut(&group(clients, Api::S3, bs)) else {
            continue;
        };
        for (sample, base) in samples.iter_mut().zip(&base) {
            for (key, name) in RATIOS {
                if let (Some(v), Some(b)) = (sample.values.get(key), base.values.get(key))
                    && *b > 0.0
                {
                    let ratio = v / b;
                    sample.values.insert(name.into(), ratio);
                }
            }
        }
    }
}

/// The numbers of concurrent clients the daemon workload runs with.
pub const CLIENTS: [usize; 2] = [1, 8];

/// The S3 rows next to the file API's.
pub fn print(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let bs = args.daemon_block_size;
    let get = |group: &str, key: &str| stats.get(group).and_then(|g| g.get(key));
    let fmt = |s: Option<&Stat>, places: usize| {
        s.map_or("-".to_owned(), |s| {
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        })
    };
    println!(
        "\ndaemon, file API (reqwest) and S3 endpoint (object_store: PutObject, GetObject{}): {} MiB at {} blocks, median of {} runs (min-max); S3 / file API taken run by run",
        if crate::s3_unsigned_payload() {
            ", UNSIGNED-PAYLOAD"
        } else {
            ""
        },
        args.daemon_data_mib,
        label(bs),
        args.runs
    );
    println!(
        "{:<8} {:<7} {:<18} {:>26} {:>26} {:>22}",
        "block", "clients", "phase", "file API", "S3", "S3 / file API"
    );
    let rows = [
        ("write+flush MiB/s", "write_flush_mib_s", 1),
        ("cold read MiB/s", "cold_read_mib_s", 1),
        ("hot read MiB/s", "hot_read_mib_s", 1),
        ("write+flush CPU s", "write_flush_cpu_s", 2),
    ];
    for clients in CLIENTS {
        let http = group(clients, Api::Http, bs);
        let s3 = group(clients, Api::S3, bs);
        for (name, key, places) in rows {
            let ratio = RATIOS
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, r)| get(&s3, r));
            println!(
                "{:<8} {:<7} {:<18} {:>26} {:>26} {:>22}",
                label(bs),
                clients,
                name,
                fmt(get(&http, key), places),
                fmt(get(&s3, key), places),
                ratio.map_or("-".to_owned(), |r| format!(
                    "{:.2}x ({:.2}-{:.2})",
                    r.median, r.min, r.max
                )),
            );
        }
        let rss = |g: &str| get(g, "peak_rss_bytes").map_or(0.0, |s| s.max) / MIB;
        println!(
            "{:<8} {:<7} {:<18} {:>26} {:>26}",
            label(bs),
            clients,
            "daemon peak RSS",
            format!("{:.1} MiB", rss(&http)),
            format!("{:.1} MiB", rss(&s3)),
        );
    }
}
