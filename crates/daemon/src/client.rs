//! Command-line clients of a running daemon. Transfers stream (memory stays bounded) and
//! show a progress bar when standard error is a terminal.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::settings::{Endpoint, Secret, SettingsFile};

/// How to reach the daemon: the same settings it runs with.
#[derive(Debug, clap::Args)]
pub struct Target {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    file: SettingsFile,
}

/// Characters of a name that go into a URL path as they are: everything else is
/// percent-encoded, `/` included only where it separates segments.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<Secret>,
}

impl Client {
    fn new(t: Target) -> Self {
        Self::at(t.endpoint)
    }

    fn at(endpoint: Endpoint) -> Self {
        let mut addr = endpoint.listen;
        // A daemon listening on every address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            token: endpoint.auth_token,
        }
    }

    fn file_url(&self, name: &str) -> String {
        let encoded: Vec<String> = name
            .split('/')
            .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
            .collect();
        let mut path = encoded.join("/");
        // `.../status` is the status route: send the last separator encoded.
        if let Some(i) = path.rfind('/')
            && &path[i..] == "/status"
        {
            path.replace_range(i..=i, "%2F");
        }
        format!("{}/v1/files/{path}", self.base)
    }

    /// What a request that got no answer says: for a refused connection, that no daemon
    /// listens there and how to point at one; otherwise the error with its causes.
    fn unreachable(&self, e: &reqwest::Error) -> String {
        if refused(e) {
            format!(
                "cannot reach the daemon at {}: connection refused: is the daemon running? (start it with `blockcache serve`, or point at it with --listen or BLOCKCACHE_LISTEN)",
                self.base
            )
        } else {
            format!(
                "cannot reach the daemon at {}: {}",
                self.base,
                crate::error::chain(e)
            )
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t.expose()),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let response = r.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(text);
        Err(format!("{message} (HTTP {status})"))
    }
}

fn progress(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    }
}

/// The JSON of an answer of the daemon.
async fn json_of(response: reqwest::Response) -> Result<serde_json::Value, String> {
    response
        .json()
        .await
        .map_err(|e| format!("the daemon sent a bad answer: {e}"))
}

async fn print_json(response: reqwest::Response) -> Result<(), String> {
    let v = json_of(response).await?;
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

/// `bytes` in KiB, MiB, ... (two decimals), or as a number with `exact`.
fn human(bytes: u64, exact: bool) -> String {
    if exact {
        bytes.to_string()
    } else {
        bytesize::ByteSize(bytes).display().iec().to_string()
    }
}

/// `blockcache stats`
pub async fn stats(t: Target, json: bool) -> Result<(), String> {
    let c = Client::new(t);
    let r = c
        .send(c.request(reqwest::Method::GET, &format!("{}/v1/stats", c.base)))
        .await?;
    if json {
        return print_json(r).await;
    }
    let v = json_of(r).await?;
    let b = |x: &serde_json::Value| human(x.as_u64().unwrap_or(0), false);
    println!(
        "cache     {} of {} in {} blocks",
        b(&v["cache"]["bytes"]),
        b(&v["cache"]["max_bytes"]),
        v["cache"]["entries"]
    );
    println!(
        "dirty     {} of {} in {} blocks, oldest {:.0} s",
        b(&v["dirty"]["bytes"]),
        b(&v["dirty"]["max_bytes"]),
        v["dirty"]["entries"],
        v["dirty"]["oldest_age_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "store     {} (logical {}, unique {}; dedup {}x, compression {}x)",
        if v["store_up"].as_bool().unwrap_or(false) {
            "up"
        } else {
            "DOWN"
        },
        b(&v["store"]["logical_bytes"]),
        b(&v["store"]["unique_bytes"]),
        v["store"]["dedup_ratio"],
        v["store"]["compression_ratio"]
    );
    println!(
        "uploads   {} ({}), {} failed; {} in flight; {} removals pending",
        v["counters"]["uploads"],
        b(&v["counters"]["upload_bytes"]),
        v["counters"]["upload_errors"],
        v["uploads_in_flight"],
        v["pending_removals"]
    );
    println!(
        "downloads {} ({}), {} failed; cache hits {}, misses {}",
        v["counters"]["downloads"],
        b(&v["counters"]["download_bytes"]),
        v["counters"]["download_errors"],
        v["counters"]["hits"],
        v["counters"]["misses"]
    );
    println!(
        "metadata  generation {}, {} changes pending, {:.0} s behind",
        v["metadata"]["generation"],
        v["metadata"]["pending_changes"],
        v["metadata"]["lag_seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// `blockcache stat NAME`
pub async fn stat(t: Target, name: String, json: bool) -> Result<(), String> {
    blockcache::validate_name(&name).map_err(|e| e.to_string())?;
    let c = Client::new(t);
    let r = c
        .send(c.request(
            reqwest::Method::GET,
            &format!("{}/status", c.file_url(&name)),
        ))
        .await?;
    if json {
        return print_json(r).await;
    }
    let v = json_of(r).await?;
    let f = &v["file"];
    println!("name      {}", f["name"].as_str().unwrap_or(&name));
    println!(
        "size      {} ({} bytes)",
        human(f["size"].as_u64().unwrap_or(0), false),
        f["size"]
    );
    println!("modified  {}", f["mtime"].as_str().unwrap_or(""));
    println!("etag      {}", f["etag"].as_str().unwrap_or(""));
    println!(
        "blocks    {}: {} cached, {} dirty, {} uploading, {} in the store{}",
        v["blocks"],
        v["cached"],
        v["dirty"],
        v["uploading"],
        v["uploaded"],
        if v["in_store"].as_bool().unwrap_or(false) {
            " (all of it)"
        } else {
            ""
        }
    );
    Ok(())
}

/// `blockcache flush`
pub async fn flush(t: Target, name: Option<String>) -> Result<(), String> {
    let c = Client::new(t);
    let mut r = c.request(reqwest::Method::POST, &format!("{}/v1/flush", c.base));
    if let Some(name) = &name {
        r = r.query(&[("name", name)]);
    }
    print_json(c.send(r).await?).await
}

/// `blockcache drop-cache`
pub async fn drop_cache(t: Target) -> Result<(), String> {
    let c = Client::new(t);
    let r = c
        .send(c.request(reqwest::Method::POST, &format!("{}/v1/cache/drop", c.base)))
        .await?;
    print_json(r).await
}

/// `blockcache put NAME [FILE]`
pub async fn put(
    t: Target,
    name: String,
    file: Option<PathBuf>,
    durability: Option<String>,
) -> Result<(), String> {
    // What can be checked here is checked before anything is sent: the daemon refuses a
    // bad request while its body is still being sent, and the client then sees a broken
    // connection instead of the daemon's answer.
    blockcache::validate_name(&name).map_err(|e| e.to_string())?;
    if let Some(d) = &durability {
        d.parse::<blockcache::Durability>()
            .map_err(|e| format!("--durability: {e}"))?;
    }
    let c = Client::new(t);
    let file = file.filter(|p| p.as_os_str() != "-");
    let (reader, len): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = match &file {
        Some(p) => {
            let f = tokio::fs::File::open(p)
                .await
                .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            let meta = f
                .metadata()
                .await
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            if meta.is_dir() {
                return Err(format!(
                    "{} is a directory: put stores one file (give a file, or - for standard input)",
                    p.display()
                ));
            }
            let len = meta.is_file().then_some(meta.len());
            (Box::new(f), len)
        }
        None => {
            if std::io::stdin().is_terminal() {
                return Err(
                    "no FILE given, and standard input is a terminal: give FILE, or pipe the data into put (put NAME - reads standard input)"
                        .to_owned(),
                );
            }
            (Box::new(tokio::io::stdin()), None)
        }
    };
    let bar = progress(len);
    let b = bar.clone();
    let stream = ReaderStream::with_capacity(reader, 256 * 1024)
        .inspect_ok(move |chunk| b.inc(chunk.len() as u64));
    let mut r = c
        .request(reqwest::Method::PUT, &c.file_url(&name))
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(len) = len {
        r = r.header(reqwest::header::CONTENT_LENGTH, len);
    }
    if let Some(d) = &durability {
        r = r.query(&[("durability", d)]);
    }
    let response = c.send(r).await;
    bar.finish_and_clear();
    let v = json_of(response?).await?;
    eprintln!(
        "stored {name}: {} bytes, etag {}",
        v["size"],
        v["etag"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `blockcache get NAME [FILE]`
pub async fn get(t: Target, name: String, file: Option<PathBuf>) -> Result<(), String> {
    let c = Client::new(t);
    let response = c
        .send(c.request(reqwest::Method::GET, &c.file_url(&name)))
        .await?;
    let bar = progress(response.content_length());
    let file = file.filter(|p| p.as_os_str() != "-");
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match &file {
        Some(p) => Box::new(
            tokio::fs::File::create(p)
                .await
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("the transfer of {name} broke off: {e}"))?;
        out.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write the output: {e}"))?;
        bar.inc(chunk.len() as u64);
    }
    out.flush()
        .await
        .map_err(|e| format!("cannot write the output: {e}"))?;
    bar.finish_and_clear();
    Ok(())
}

/// `blockcache rm NAME`
pub async fn rm(t: Target, name: String) -> Result<(), String> {
    let c = Client::new(t);
    c.send(c.request(reqwest::Method::DELETE, &c.file_url(&name)))
        .await?;
    Ok(())
}

/// `blockcache ls [PREFIX]`
pub async fn ls(t: Target, prefix: Option<String>, bytes: bool, json: bool) -> Result<(), String> {
    let c = Client::new(t);
    let mut first = true;
    if json {
        print!("[");
    }
    let result = list_files(&c, prefix.as_deref().unwrap_or(""), |f| {
        if json {
            print!("{}{}", if first { "\n  " } else { ",\n  " }, f);
            first = false;
        } else {
            println!(
                "{:>12}  {}  {}",
                human(f["size"].as_u64().unwrap_or(0), bytes),
                f["mtime"].as_str().unwrap_or(""),
                f["name"].as_str().unwrap_or("")
            );
        }
    })
    .await;
    if json {
        println!("{}]", if first { "" } else { "\n" });
    }
    result
}

/// Calls `each` with every file whose name starts with `prefix`, page by page.
async fn list_files(
    c: &Client,
    prefix: &str,
    mut each: impl FnMut(&serde_json::Value),
) -> Result<(), String> {
    let mut after: Option<String> = None;
    loop {
        let mut q = vec![("prefix", prefix.to_owned())];
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let r = c
            .send(
                c.request(reqwest::Method::GET, &format!("{}/v1/files", c.base))
                    .query(&q),
            )
            .await?;
        let v = json_of(r).await?;
        for f in v["files"].as_array().into_iter().flatten() {
            each(f);
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return Ok(()),
        }
    }
}

/// The files under `dir`, as paths relative to it with `/` separators, and their total
/// size. Symbolic links are not followed; anything but a regular file or a directory is
/// refused.
fn walk(dir: &std::path::Path) -> Result<(Vec<(PathBuf, String)>, u64), String> {
    let mut files = Vec::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| format!("cannot list {}: {e}", d.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", d.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|r| r.to_str())
                    .ok_or_else(|| format!("{}: the name is not UTF-8", path.display()))?
                    .replace(std::path::MAIN_SEPARATOR, "/");
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                files.push((path, rel));
            } else {
                return Err(format!(
                    "{}: neither a file nor a directory (symbolic links are not followed)",
                    path.display()
                ));
            }
        }
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok((files, total))
}

/// `blockcache put -r NAME DIR`: every file under DIR as NAME/PATH, with one progress bar.
pub async fn put_tree(
    t: Target,
    name: String,
    dir: Option<PathBuf>,
    durability: Option<String>,
) -> Result<(), String> {
    let Some(dir) = dir.filter(|p| p.as_os_str() != "-") else {
        return Err("put -r takes a directory after NAME".to_owned());
    };
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if let Some(d) = &durability {
        d.parse::<blockcache::Durability>()
            .map_err(|e| format!("--durability: {e}"))?;
    }
    let base = name.trim_end_matches('/');
    let (files, total) = walk(&dir)?;
    // Every name is checked before the first byte goes.
    let named: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|(path, rel)| {
            let full = if base.is_empty() {
                rel
            } else {
                format!("{base}/{rel}")
            };
            blockcache::validate_name(&full)
                .map(|()| (path, full))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let c = Client::new(t);
    let bar = progress(Some(total));
    for (path, full) in &named {
        let f = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = f
            .metadata()
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .len();
        let b = bar.clone();
        let stream = ReaderStream::with_capacity(f, 256 * 1024)
            .inspect_ok(move |chunk| b.inc(chunk.len() as u64));
        let mut r = c
            .request(reqwest::Method::PUT, &c.file_url(full))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(d) = &durability {
            r = r.query(&[("durability", d)]);
        }
        c.send(r)
            .await
            .map_err(|e| format!("storing {} as {full}: {e}", path.display()))?;
    }
    bar.finish_and_clear();
    eprintln!(
        "stored {} files ({}) under {}",
        named.len(),
        human(total, false),
        if base.is_empty() { "/" } else { base }
    );
    Ok(())
}

/// `blockcache get -r NAME DIR`: every file named NAME/PATH into DIR/PATH, with one
/// progress bar.
pub async fn get_tree(t: Target, name: String, dir: Option<PathBuf>) -> Result<(), String> {
    let Some(dir) = dir.filter(|p| p.as_os_str() != "-") else {
        return Err("get -r takes a directory after NAME".to_owned());
    };
    let base = name.trim_end_matches('/');
    let prefix = if base.is_empty() {
        String::new()
    } else {
        format!("{base}/")
    };
    let c = Client::new(t);
    let mut files: Vec<(String, u64)> = Vec::new();
    list_files(&c, &prefix, |f| {
        if let Some(n) = f["name"].as_str() {
            files.push((n.to_owned(), f["size"].as_u64().unwrap_or(0)));
        }
    })
    .await?;
    let total = files.iter().map(|f| f.1).sum();
    let bar = progress(Some(total));
    for (full, _) in &files {
        let Some(rel) = full.strip_prefix(&prefix) else {
            return Err(format!(
                "the daemon listed {full:?}, which is not under {prefix:?}"
            ));
        };
        // The daemon refuses such names; checked again so that no answer can climb out.
        if rel
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(format!(
                "the daemon listed {full:?}, which is no path under {base:?}"
            ));
        }
        let path = rel.split('/').fold(dir.clone(), |p, seg| p.join(seg));
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let response = c
            .send(c.request(reqwest::Method::GET, &c.file_url(full)))
            .await?;
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("the transfer of {full} broke off: {e}"))?;
            out.write_all(&chunk)
                .await
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            bar.inc(chunk.len() as u64);
        }
        out.flush()
            .await
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    bar.finish_and_clear();
    eprintln!(
        "wrote {} files ({}) into {}",
        files.len(),
        human(total, false),
        dir.display()
    );
    Ok(())
}

/// Whether `e` failed because nothing listens at the address (connection refused).
fn refused(e: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// `blockcache check` through the daemon at `endpoint`: its report, or `None` when nothing
/// listens there (the caller checks the volume directly).
pub async fn check(
    endpoint: &Endpoint,
    args: &crate::check::CheckArgs,
) -> Result<Option<blockcache::CheckReport>, String> {
    let c = Client::at(endpoint.clone());
    let mut query = vec![
        ("grace", humantime::format_duration(args.grace).to_string()),
        ("verify_rate", args.verify_rate.0.to_string()),
    ];
    if args.repair {
        query.push(("repair", "1".to_owned()));
    }
    if args.verify_data {
        query.push(("verify_data", "1".to_owned()));
    }
    let request = c
        .request(reqwest::Method::POST, &format!("{}/v1/check", c.base))
        .query(&query);
    let response = match request.send().await {
        Err(e) if refused(&e) => return Ok(None),
        Err(e) => return Err(c.unreachable(&e)),
        Ok(r) => r,
    };
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("the daemon's answer broke off: {e}"))?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or(text);
        return Err(format!("{message} (HTTP {status})"));
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("the daemon sent a bad answer: {e}"))
}
