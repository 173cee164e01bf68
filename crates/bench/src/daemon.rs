//! The daemon workload: the release `blockcache` binary started on a free port with a fresh
//! data directory, and the library workload's files sent through its HTTP API by N concurrent
//! clients (reqwest, streaming bodies generated block by block).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{Args, Error, FILE_BYTES, MIB, Sample, Spares, cpu_of, fill, peak_rss_of, seed_of};

/// A running daemon, killed if dropped before [`Daemon::stop`].
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The daemon's standard output, kept open: a daemon that prints to a closed pipe
    /// panics.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
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
    use std::io::BufRead;
    let mut child = Command::new(binary()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--upload-delay", "off"])
        // A plain volume, as the library workload it is compared with (see `open`).
        .args(["--compression", "none"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--block-size", &block_size.to_string()])
        .args(["--max-cache-size", &cache_bytes.to_string()])
        .args(["--log-level", "warn"])
        // The endpoint is on by default, on a fixed port that another daemon may hold.
        .args(["--s3-listen", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("blockcache listening on ")
        .ok_or_else(|| format!("the daemon did not start: {line:?}"))?
        .to_owned();
    Ok(Daemon {
        child,
        base,
        _stdout: stdout,
    })
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

/// The daemon workload with `clients` concurrent clients.
pub async fn daemon(args: &Args, clients: usize) -> Result<Sample, Error> {
    let dir = args.dir.join(format!("daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bs = args.block_size;
    let total = args.data_mib << 20;
    let files = total.div_ceil(FILE_BYTES);
    let blocks_per_file = FILE_BYTES.div_ceil(bs);
    let logical = files * blocks_per_file * bs;
    let d = start(&dir, bs, 2 * logical + (64 << 20))?;
    let http = reqwest::Client::new();
    let base = d.base.clone();
    let dup = args.dup;
    let mut s = Sample::default();
    let mib_s = |t: Duration| logical as f64 / MIB / t.as_secs_f64();

    let (h, b) = (http.clone(), base.clone());
    let cpu = cpu_of(d.child.id()) + cpu_of(std::process::id());
    let spares = Spares::default();
    let write = each_file(files, clients, move |file| {
        let (h, b, spares) = (h.clone(), b.clone(), spares.clone());
        async move {
            // The body is generated block by block as it is sent: no whole file in memory.
            // A block's buffer goes back to `spares` once hyper has sent and dropped it, so
            // the client does not pay for fresh pages each block.
            let body = futures::stream::iter(0..blocks_per_file).map(move |blk| {
                let mut buf = spares.take(bs as usize);
                fill(&mut buf, seed_of(file * blocks_per_file + blk, dup));
                Ok::<_, std::io::Error>(bytes::Bytes::from_owner(Spare {
                    buf,
                    home: spares.clone(),
                }))
            });
            let r = h
                .put(format!("{b}/v1/files/bench/{file}"))
                .header(reqwest::header::CONTENT_LENGTH, blocks_per_file * bs)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await?;
            check(r, "PUT").await?;
            Ok(())
        }
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
        let (h, b) = (http.clone(), base.clone());
        let t = each_file(files, clients, move |file| {
            let (h, b) = (h.clone(), b.clone());
            async move {
                let r = check(
                    h.get(format!("{b}/v1/files/bench/{file}")).send().await?,
                    "GET",
                )
                .await?;
                let mut n = 0u64;
                let mut body = r.bytes_stream();
                while let Some(chunk) = body.next().await {
                    n += chunk?.len() as u64;
                }
                if n != blocks_per_file * bs {
                    return Err(format!("file {file}: {n} bytes").into());
                }
                Ok(())
            }
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
