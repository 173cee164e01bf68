//! The plain-client workload (`--only plain`): what a user with curl or Python's urllib
//! sees. One client, one connection, files of 64 MiB sent one after another through the
//! daemon's file API with the default durability (on local disk), then a flush; then the
//! same files read back hot. Against the same bytes copied into files on the same disk and
//! synced one by one (copy+sync), and read back from the page cache, in the same child.
//!
//! The client is a plain blocking HTTP/1.1 client on one `TcpStream` (no async runtime, no
//! connection pool), writing each file from a buffer generated beforehand, as `curl -T`
//! sends a file: the figures are the daemon's, not a client's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::{Args, Error, MIB, Sample, cpu_of, fill, peak_rss_of, seed_of};

/// The size of each file.
const PLAIN_FILE: u64 = 64 << 20;
/// Bytes written to the socket per call, as curl does with its upload buffer.
const CHUNK: usize = 64 << 10;

/// One HTTP/1.1 connection to the daemon.
struct Conn {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    fn open(base: &str) -> Result<Self, Error> {
        let host = base
            .strip_prefix("http://")
            .ok_or("the daemon's address is not http://")?
            .to_owned();
        let stream = TcpStream::connect(&host)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        Ok(Self {
            stream: BufReader::with_capacity(CHUNK, stream),
            host,
        })
    }

    /// Sends a request with `body` and reads the answer's head; returns its status and
    /// content length.
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, u64), Error> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes())?;
        for chunk in body.chunks(CHUNK) {
            s.write_all(chunk)?;
        }
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP status in {line:?}"))?;
        let mut len = 0;
        loop {
            line.clear();
            self.stream.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        Ok((status, len))
    }

    /// [`Conn::request`] whose body is read and dropped (into `buf`, reused); fails on any
    /// status but 2xx.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        buf: &mut [u8],
    ) -> Result<u64, Error> {
        let (status, mut len) = self.request(method, path, body)?;
        let total = len;
        while len > 0 {
            let want = len.min(buf.len() as u64) as usize;
            let n = self.stream.read(&mut buf[..want])?;
            if n == 0 {
                return Err(format!("{method} {path}: the answer was cut off").into());
            }
            len -= n as u64;
        }
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: HTTP {status}").into());
        }
        Ok(total)
    }
}

/// The child `plain`: the daemon (default durability, a plain volume as in the daemon
/// workload) and the copy+sync reference, on `--data-mib` in files of [`PLAIN_FILE`].
pub fn plain(args: &Args) -> Result<Sample, Error> {
    let bs = args.block_size;
    let files = (args.data_mib << 20).div_ceil(PLAIN_FILE).max(1);
    let logical = files * PLAIN_FILE;
    let mib_s = |t: Duration| logical as f64 / MIB / t.as_secs_f64();
    let content = |f: u64, buf: &mut Vec<u8>| {
        buf.resize(PLAIN_FILE as usize, 0);
        for (b, block) in buf.chunks_mut(bs as usize).enumerate() {
            fill(
                block,
                seed_of(f * PLAIN_FILE.div_ceil(bs) + b as u64, args.dup),
            );
        }
    };
    let mut s = Sample::default();
    let mut data = Vec::new();
    let mut sink = vec![0u8; 1 << 20];

    // The reference first: copy+sync, then reading back from the page cache.
    let dir = args.dir.join(format!("plain-ref-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut took = Duration::ZERO;
    for f in 0..files {
        content(f, &mut data);
        let start = Instant::now();
        let mut file = std::fs::File::create(dir.join(f.to_string()))?;
        for chunk in data.chunks(CHUNK) {
            file.write_all(chunk)?;
        }
        file.sync_all()?;
        took += start.elapsed();
    }
    let start = Instant::now();
    std::fs::File::open(&dir)?.sync_all()?;
    took += start.elapsed();
    s.values.insert("copy_sync_mib_s".into(), mib_s(took));
    let start = Instant::now();
    for f in 0..files {
        let mut file = std::fs::File::open(dir.join(f.to_string()))?;
        while file.read(&mut sink)? > 0 {}
    }
    s.values
        .insert("page_cache_read_mib_s".into(), mib_s(start.elapsed()));
    let _ = std::fs::remove_dir_all(&dir);

    // The daemon.
    let ddir = args.dir.join(format!("plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ddir);
    let d = crate::daemon::start_defaults(&ddir, bs, 2 * logical + (64 << 20))?;
    let mut conn = Conn::open(&d.base)?;
    let cpu = cpu_of(d.pid());
    let mut took = Duration::ZERO;
    for f in 0..files {
        content(f, &mut data);
        let start = Instant::now();
        conn.call("PUT", &format!("/v1/files/plain/{f}"), &data, &mut sink)?;
        took += start.elapsed();
    }
    let start = Instant::now();
    conn.call("POST", "/v1/flush", &[], &mut sink)?;
    let flush = start.elapsed();
    s.values.insert("write_mib_s".into(), mib_s(took));
    s.values
        .insert("write_flush_mib_s".into(), mib_s(took + flush));
    s.values.insert(
        "write_flush_cpu_ms_per_mib".into(),
        (cpu_of(d.pid()) - cpu) * 1e3 / (logical as f64 / MIB),
    );
    let cpu = cpu_of(d.pid());
    let start = Instant::now();
    for f in 0..files {
        let n = conn.call("GET", &format!("/v1/files/plain/{f}"), &[], &mut sink)?;
        if n != PLAIN_FILE {
            return Err(format!("file {f}: {n} bytes").into());
        }
    }
    s.values
        .insert("hot_read_mib_s".into(), mib_s(start.elapsed()));
    s.values.insert(
        "hot_read_cpu_ms_per_mib".into(),
        (cpu_of(d.pid()) - cpu) * 1e3 / (logical as f64 / MIB),
    );
    s.values
        .insert("peak_rss_bytes".into(), peak_rss_of(d.pid()) as f64);
    drop(conn);
    d.stop()?;
    let _ = std::fs::remove_dir_all(&ddir);
    for (key, reference, ratio) in [
        (
            "write_flush_mib_s",
            "copy_sync_mib_s",
            "write_flush_vs_copy_sync",
        ),
        (
            "hot_read_mib_s",
            "page_cache_read_mib_s",
            "hot_read_vs_page_cache",
        ),
    ] {
        let v = s.values[key] / s.values[reference];
        s.values.insert(ratio.into(), v);
    }
    Ok(s)
}

/// The block sizes of the workload.
pub const BLOCK_SIZES: [u64; 2] = [1 << 20, 64 << 10];

pub fn group(bs: u64) -> String {
    format!("plain/{}", crate::label(bs))
}

/// The table.
pub fn print(
    args: &Args,
    stats: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, crate::Stat>>,
) {
    println!(
        "\nplain client (one connection, 64 MiB files one after another, default durability) against copy+sync and page-cache reads of the same bytes: {} MiB, median of {} runs (min-max)",
        args.data_mib.max(64),
        args.runs
    );
    println!(
        "{:<8} {:<26} {:>24} {:>24} {:>20}",
        "block", "phase", "daemon MiB/s", "reference MiB/s", "ratio"
    );
    let fmt = |s: Option<&crate::Stat>, places: usize| {
        s.map_or("-".to_owned(), |s| {
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        })
    };
    for bs in BLOCK_SIZES {
        let Some(g) = stats.get(&group(bs)) else {
            continue;
        };
        for (name, key, reference, ratio) in [
            (
                "write+flush / copy+sync",
                "write_flush_mib_s",
                "copy_sync_mib_s",
                "write_flush_vs_copy_sync",
            ),
            (
                "hot read / page cache",
                "hot_read_mib_s",
                "page_cache_read_mib_s",
                "hot_read_vs_page_cache",
            ),
        ] {
            println!(
                "{:<8} {:<26} {:>24} {:>24} {:>20}",
                crate::label(bs),
                name,
                fmt(g.get(key), 1),
                fmt(g.get(reference), 1),
                fmt(g.get(ratio), 2),
            );
        }
        println!(
            "{:<8} {:<26} write+flush {} ms/MiB, hot read {} ms/MiB of daemon CPU; peak RSS {:.0} MiB",
            crate::label(bs),
            "daemon CPU",
            fmt(g.get("write_flush_cpu_ms_per_mib"), 2),
            fmt(g.get("hot_read_cpu_ms_per_mib"), 2),
            g.get("peak_rss_bytes").map_or(0.0, |s| s.max) / MIB,
        );
    }
}
