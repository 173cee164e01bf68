//! Settings: each one is defined once, as a field of [`Settings`] (or [`Endpoint`], which the
//! clients share): its flag, its `BLOCKCACHE_*` variable, its key in the TOML file, its help
//! and its default all come from that definition. The defaults that belong to the engine
//! (block size, cache limits, uploads) are read from [`blockcache::Config::new`].
//!
//! Precedence, later wins: built-in default, TOML file (`--config`), environment, flag. Clap
//! orders the last three itself once the file's values are handed to it as defaults
//! ([`parse`]); the file's values go through the same parsers as flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use blockcache::{Config, Durability};
use blockcache_backend::format::{Compression, Key};
use clap::Args;

/// The port the daemon listens on by default (on 127.0.0.1).
pub const DEFAULT_PORT: u16 = 8640;

/// The S3 endpoint's port unless `--s3-listen` says otherwise.
pub const DEFAULT_S3_PORT: u16 = 8641;

/// Where the S3 endpoint listens: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Listen(pub Option<SocketAddr>);

impl std::str::FromStr for S3Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        socket_addr(s)
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{e}, or off"))
    }
}

/// An address to listen on: `ADDR:PORT`, or `HOST:PORT` with a host name that resolves
/// (`localhost:8640`; the first address it resolves to).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim();
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if s.rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(format!("{s:?} is not ADDR:PORT (or HOST:PORT)"));
    }
    let mut found = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: the host name does not resolve ({e})"))?;
    found
        .next()
        .ok_or_else(|| format!("{s:?}: the host name resolves to no address"))
}

impl std::fmt::Display for S3Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// The S3 access keys the endpoint accepts: `--s3-access-key` with `--s3-secret-key`, and
/// the lines `ACCESS_KEY SECRET_KEY` of `--s3-credentials-file` (`#` starts a comment).
pub fn s3_credentials(
    access_key: Option<&str>,
    secret_key: Option<&Secret>,
    file: Option<&Path>,
) -> Result<Vec<(String, String)>, String> {
    let mut keys = Vec::new();
    match (access_key, secret_key) {
        (Some(a), Some(s)) => keys.push((a.to_owned(), s.expose().to_owned())),
        (None, None) => {}
        _ => return Err("--s3-access-key and --s3-secret-key go together".to_owned()),
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--s3-credentials-file {}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(s), None) => keys.push((a.to_owned(), s.to_owned())),
                _ => {
                    return Err(format!(
                        "--s3-credentials-file {} line {}: write ACCESS_KEY SECRET_KEY",
                        path.display(),
                        i + 1
                    ));
                }
            }
        }
    }
    Ok(keys)
}

/// The engine's own defaults, which the daemon's defaults are.
static ENGINE: LazyLock<Config> = LazyLock::new(|| Config::new(""));

/// A secret that never shows in logs, errors or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparing and sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // What a client can send after `Bearer ` in a header, and what cannot be a blank or
        // a typo's leftover: visible ASCII only.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the auth token must be 1 or more visible ASCII characters (no spaces, no control characters); leave the setting out for no token".into(),
            );
        }
        Ok(Self(s.to_owned()))
    }
}

/// A byte size: a number with an optional unit ("4GiB", "512 KiB", "1MB", "65536").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let hint = "write a number of bytes with an optional unit such as 64KiB, 1MiB, 4GiB";
        if s.trim().starts_with('-') {
            return Err(format!(
                "invalid size {s:?}: a size cannot be negative; {hint}"
            ));
        }
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?} ({e}); {hint}"))
    }
}

impl Size {
    /// A parser of sizes from `min` to `max` bytes, whose error names the range.
    pub fn between(min: u64, max: u64) -> impl Fn(&str) -> Result<Size, String> + Clone {
        move |s| {
            let size: Size = s.parse()?;
            if (min..=max).contains(&size.0) {
                Ok(size)
            } else {
                Err(format!(
                    "{s:?} is out of range: allowed from {} to {}",
                    Size(min),
                    Size(max)
                ))
            }
        }
    }
}

/// A parser of integers from `min` to `max`, whose error names the range.
fn integer_between<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    move |s| match s.trim().parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        Ok(_) => Err(format!(
            "{s:?} is out of range: allowed from {min} to {max}"
        )),
        Err(_) => Err(format!(
            "invalid number {s:?}: write a whole number from {min} to {max}"
        )),
    }
}

/// A timeout: a duration from 1 ms to a day ("500ms", "30s", "2min").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Duration);

impl std::str::FromStr for Timeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write for example 500ms, 30s, 2min")
        })?;
        if d < Duration::from_millis(1) || d > Duration::from_secs(24 * 3600) {
            return Err(format!("{s:?} is out of range: allowed from 1ms to 24h"));
        }
        Ok(Self(d))
    }
}

impl std::fmt::Display for Timeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// The largest block size the engine takes.
pub const MAX_BLOCK_SIZE: u64 = 1 << 30;
/// The largest file: offsets and sizes are 64-bit signed numbers in the metadata, and a
/// limit well below `i64::MAX` leaves room for a block past any offset.
pub const MAX_FILE_SIZE: u64 = 1 << 62;
/// The most concurrent uploads the engine takes.
const MAX_UPLOAD_TASKS: usize = 1024;

/// The exact size in the largest binary unit that divides it ("1MiB", "65536"): what help
/// shows as a default, and parses back to the same size.
impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, shift) in [
            ("EiB", 60),
            ("PiB", 50),
            ("TiB", 40),
            ("GiB", 30),
            ("MiB", 20),
            ("KiB", 10),
        ] {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A delay that can be switched off: a duration ("10s", "500ms", "2min"), or "0" or "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay(pub Option<Duration>);

impl std::str::FromStr for Delay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s == "off" {
            return Ok(Delay(None));
        }
        humantime::parse_duration(s)
            .map(|d| Delay((!d.is_zero()).then_some(d)))
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write for example 500ms, 10s, 2min, or off")
            })
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => humantime::format_duration(d).fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// The encryption secret read from `--encryption-key-file` or
/// `--encryption-passphrase-file`, if one is given.
pub fn secret_from(
    key_file: Option<&std::path::Path>,
    passphrase_file: Option<&std::path::Path>,
) -> Result<Option<blockcache::Secret>, String> {
    if let Some(path) = key_file {
        let key = Key::from_key_file(path).map_err(|e| format!("--encryption-key-file: {e}"))?;
        return Ok(Some(blockcache::Secret::Key(std::sync::Arc::new(key))));
    }
    if let Some(path) = passphrase_file {
        let passphrase = blockcache_backend::format::read_passphrase_file(path)
            .map_err(|e| format!("--encryption-passphrase-file: {e}"))?;
        return Ok(Some(blockcache::Secret::Passphrase(std::sync::Arc::new(
            passphrase,
        ))));
    }
    Ok(None)
}

/// How long old metadata generations are kept: a duration of at most 100 years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Duration);

impl std::str::FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write for example 0s, 12h, 7days")
        })?;
        if d > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err(format!(
                "{s:?} is out of range: allowed from 0s to 100years"
            ));
        }
        Ok(Self(d))
    }
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// A log level or filter ("info", "blockcache=debug,warn"), checked when it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    /// The filter for the log subscriber.
    pub fn filter(&self) -> tracing_subscriber::EnvFilter {
        tracing_subscriber::EnvFilter::new(&self.0)
    }
}

impl std::str::FromStr for LogFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let help = "write a level (off, error, warn, info, debug, trace) or a filter such as blockcache=debug,warn";
        // A bare word other than a level is taken by the filter as a target with every
        // level, which turns all other logging off: "inf" for "info" would silence the
        // daemon. Targets are written TARGET=LEVEL.
        for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let bare = !directive.contains('=') && !directive.contains('[');
            let level = ["off", "error", "warn", "info", "debug", "trace"]
                .iter()
                .any(|l| directive.eq_ignore_ascii_case(l));
            if bare && !level {
                return Err(format!(
                    "invalid filter {s:?}: {directive:?} is not a level; {help}"
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(s)
            .map(|_| Self(s.to_owned()))
            .map_err(|e| format!("invalid filter {s:?} ({e}); {help}"))
    }
}

impl std::fmt::Display for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the daemon listens and the token it asks for: settings of the daemon that its
/// clients read too, to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct Endpoint {
    /// Address of the daemon (ADDR:PORT; port 0 picks a free one)
    #[arg(long, env = "BLOCKCACHE_LISTEN", value_name = "ADDR:PORT",
          default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
          value_parser = socket_addr)]
    pub listen: SocketAddr,
    /// Bearer token every route but /healthz requires
    #[arg(
        long,
        env = "BLOCKCACHE_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<Secret>,
}

/// A compression name as given (`--compression`).
#[derive(Debug, Clone, Copy)]
pub struct CompressionName(pub Compression);

fn parse_compression(s: &str) -> Result<CompressionName, String> {
    s.parse()
        .map(CompressionName)
        .map_err(|e: blockcache_backend::format::FormatError| e.to_string())
}

/// The settings file, named by `--config` or `BLOCKCACHE_CONFIG`.
#[derive(Debug, Clone, clap::Args)]
pub struct SettingsFile {
    /// TOML settings file: keys as the long flags (block-size = "1MiB"); variables and flags
    /// override it
    #[arg(long = CONFIG, env = "BLOCKCACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The id and long name of the flag naming the settings file.
const CONFIG: &str = "config";

/// The daemon's settings. A field `max_cache_size` is the flag `--max-cache-size`, the
/// variable `BLOCKCACHE_MAX_CACHE_SIZE` and the file key `max-cache-size`.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub endpoint: Endpoint,
    /// Directory for the defaults of the database, cache and store
    #[arg(
        long,
        env = "BLOCKCACHE_DATA_DIR",
        value_name = "DIR",
        default_value = "./blockcache-data"
    )]
    pub data_dir: PathBuf,
    /// Cache directory [default: DATA_DIR/cache]
    #[arg(long, env = "BLOCKCACHE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Metadata database (sqlite://PATH or a path) [default: sqlite://DATA_DIR/meta.db]
    #[arg(long, env = "BLOCKCACHE_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// Object store: file://, memory://, s3://, gs://, az://, or a directory's path [default: file://DATA_DIR/store]
    #[arg(long, env = "BLOCKCACHE_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Block size, fixed when the volume is created
    #[arg(long, env = "BLOCKCACHE_BLOCK_SIZE", value_name = "SIZE",
          default_value_t = Size(ENGINE.block_size), value_parser = Size::between(1, MAX_BLOCK_SIZE))]
    pub block_size: Size,
    /// Most bytes the cache directory holds
    #[arg(long, env = "BLOCKCACHE_MAX_CACHE_SIZE", value_name = "SIZE",
          default_value_t = Size(ENGINE.max_bytes), value_parser = Size::between(1, u64::MAX))]
    pub max_cache_size: Size,
    /// Most files the cache directory holds
    #[arg(long, env = "BLOCKCACHE_MAX_ENTRIES", value_name = "N",
          default_value_t = ENGINE.max_entries, value_parser = integer_between::<u64>(1, u64::MAX))]
    pub max_entries: u64,
    /// Most dirty bytes before writers wait
    #[arg(long, env = "BLOCKCACHE_MAX_DIRTY", value_name = "SIZE",
          default_value_t = Size(ENGINE.max_dirty_bytes), value_parser = Size::between(1, u64::MAX))]
    pub max_dirty: Size,
    /// Most uploads at once; how many run adapts between 8 and this to the store's latency
    #[arg(long, env = "BLOCKCACHE_UPLOAD_TASKS", value_name = "N",
          default_value_t = ENGINE.upload_tasks, value_parser = integer_between::<usize>(1, MAX_UPLOAD_TASKS))]
    pub upload_tasks: usize,
    /// Age at which a dirty block is uploaded in the background; "off" disables
    #[arg(long, env = "BLOCKCACHE_UPLOAD_DELAY", value_name = "DURATION",
          default_value_t = Delay(ENGINE.upload_delay))]
    pub upload_delay: Delay,
    /// Longest a store operation takes, retries included; writers waiting for the dirty
    /// budget while nothing reaches the store get 503 after it
    #[arg(long, env = "BLOCKCACHE_STORE_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(Duration::from_secs(30)))]
    pub store_timeout: Timeout,
    /// Compression of new objects: zstd, lz4 or none (a volume created with none and no
    /// encryption stores plain objects, and a file:// store may hard-link them)
    #[arg(long, env = "BLOCKCACHE_COMPRESSION", value_name = "zstd|lz4|none",
          default_value = "zstd", value_parser = parse_compression)]
    pub compression: CompressionName,
    /// zstd level (1 fast .. 19 small; negative levels are faster still) [default: 1]
    #[arg(
        long,
        env = "BLOCKCACHE_COMPRESSION_LEVEL",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub compression_level: Option<i32>,
    /// File of 32 random bytes: the volume's encryption key (XChaCha20-Poly1305); an
    /// encrypted volume is encrypted from its creation on
    #[arg(
        long,
        env = "BLOCKCACHE_ENCRYPTION_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "encryption_passphrase_file"
    )]
    pub encryption_key_file: Option<PathBuf>,
    /// File holding a passphrase, turned into the volume's encryption key with argon2id
    #[arg(
        long,
        env = "BLOCKCACHE_ENCRYPTION_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub encryption_passphrase_file: Option<PathBuf>,
    /// Time to live of the volume's writer lease in the store: another daemon may take a
    /// lease not renewed for this long; a daemon stops writing after half of it without a
    /// renewal
    #[arg(long, env = "BLOCKCACHE_LEASE_TTL", value_name = "DURATION",
          default_value_t = Timeout(ENGINE.lease_ttl))]
    pub lease_ttl: Timeout,
    /// Take the volume's writer lease even though its holder's has not expired: only when
    /// that holder's machine is known to be dead
    #[arg(long, env = "BLOCKCACHE_FORCE_TAKEOVER")]
    pub force_takeover: bool,
    /// Longest the metadata in the store lags behind changes (a flush ships it at once);
    /// "off": only at flushes
    #[arg(long, env = "BLOCKCACHE_METADATA_INTERVAL", value_name = "DURATION",
          default_value_t = Delay(ENGINE.metadata_interval))]
    pub metadata_interval: Delay,
    /// How long an older metadata generation stays in the store after a newer one is
    /// complete (the two newest always stay)
    #[arg(long, env = "BLOCKCACHE_METADATA_KEEP", value_name = "DURATION",
          default_value_t = Keep(ENGINE.metadata_keep))]
    pub metadata_keep: Keep,
    /// Durability of writes when a request does not say: none, local or store
    #[arg(long, env = "BLOCKCACHE_DURABILITY", value_name = "none|local|store",
          default_value_t = Durability::default())]
    pub durability: Durability,
    /// Largest file size
    #[arg(long, env = "BLOCKCACHE_MAX_FILE_SIZE", value_name = "SIZE",
          default_value_t = Size(1 << 40), value_parser = Size::between(1, MAX_FILE_SIZE))]
    pub max_file_size: Size,
    /// Memory for request buffers, all requests together (each PUT or PATCH holds one block,
    /// each GET up to four while sending); requests wait beyond it
    #[arg(long, env = "BLOCKCACHE_BUFFER_MEMORY", value_name = "SIZE",
          default_value_t = Size(64 << 20), value_parser = Size::between(1, u64::MAX))]
    pub buffer_memory: Size,
    /// Longest a request waits for buffer memory before it is answered 503 with Retry-After
    #[arg(long, env = "BLOCKCACHE_BUFFER_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(Duration::from_secs(30)))]
    pub buffer_timeout: Timeout,
    /// Closes a connection that has not sent a whole request header this long after it
    /// opened or after its last response (slow headers and idle keep-alive connections)
    #[arg(long, env = "BLOCKCACHE_HEADER_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(Duration::from_secs(30)))]
    pub header_timeout: Timeout,
    /// Fails a request whose body sends no bytes for this long, and a response the client
    /// reads nothing of for this long; what the request held is released
    #[arg(long, env = "BLOCKCACHE_BODY_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(Duration::from_secs(60)))]
    pub body_timeout: Timeout,
    /// Most client connections at once (at most half the file descriptors the daemon may
    /// open); more wait to be accepted
    #[arg(long, env = "BLOCKCACHE_MAX_CONNECTIONS", value_name = "N",
          default_value_t = 1024, value_parser = integer_between::<usize>(1, 1 << 20))]
    pub max_connections: usize,
    /// After SIGINT or SIGTERM, how long to wait for clients and the final flush before
    /// exiting non-zero with the dirty data left for the next start
    #[arg(long, env = "BLOCKCACHE_SHUTDOWN_TIMEOUT", value_name = "DURATION",
          default_value_t = Timeout(Duration::from_secs(30)))]
    pub shutdown_timeout: Timeout,
    /// Address of the S3 endpoint (ADDR:PORT), or "off"
    #[arg(long, env = "BLOCKCACHE_S3_LISTEN", value_name = "ADDR:PORT|off",
          default_value_t = S3Listen(Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_S3_PORT)))))]
    pub s3_listen: S3Listen,
    /// Domains of virtual-host style S3 requests (BUCKET.DOMAIN), comma-separated; without
    /// them only path-style requests are understood
    #[arg(long, env = "BLOCKCACHE_S3_DOMAIN", value_name = "DOMAIN[,DOMAIN]")]
    pub s3_domain: Option<String>,
    /// Access key of S3 requests (SigV4); with --s3-secret-key
    #[arg(long, env = "BLOCKCACHE_S3_ACCESS_KEY", value_name = "KEY")]
    pub s3_access_key: Option<String>,
    /// Secret key of --s3-access-key
    #[arg(
        long,
        env = "BLOCKCACHE_S3_SECRET_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub s3_secret_key: Option<Secret>,
    /// How long an incomplete S3 multipart upload is kept before it is aborted (its parts
    /// removed)
    #[arg(long, env = "BLOCKCACHE_MULTIPART_EXPIRY", value_name = "DURATION",
          default_value_t = Keep(Duration::from_secs(7 * 24 * 3600)))]
    pub multipart_expiry: Keep,
    /// File of S3 keys, one "ACCESS_KEY SECRET_KEY" per line, for several users
    #[arg(long, env = "BLOCKCACHE_S3_CREDENTIALS_FILE", value_name = "FILE")]
    pub s3_credentials_file: Option<PathBuf>,
    /// Allow a non-loopback address without a token (or for S3, without keys)
    #[arg(long, env = "BLOCKCACHE_INSECURE")]
    pub insecure: bool,
    /// Log format
    #[arg(long, env = "BLOCKCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter ("info", "debug", "blockcache=debug,warn")
    #[arg(
        long,
        env = "BLOCKCACHE_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log_level: LogFilter,
}

impl Settings {
    /// The engine's settings: its defaults, with what the daemon's settings set.
    pub fn engine_config(&self, cache_dir: PathBuf) -> Config {
        Config {
            block_size: self.block_size.0,
            max_bytes: self.max_cache_size.0,
            max_entries: self.max_entries,
            max_dirty_bytes: self.max_dirty.0,
            upload_tasks: self.upload_tasks,
            upload_delay: self.upload_delay.0,
            dirty_wait: Some(self.store_timeout.0),
            compression: self.compression(),
            lease_ttl: self.lease_ttl.0,
            force_takeover: self.force_takeover,
            metadata_interval: self.metadata_interval.0,
            metadata_keep: self.metadata_keep.0,
            ..Config::new(cache_dir)
        }
    }

    /// The compression of new objects (`--compression` at `--compression-level`).
    fn compression(&self) -> Compression {
        match (self.compression.0, self.compression_level) {
            (Compression::Zstd { .. }, Some(level)) => Compression::Zstd { level },
            (c, _) => c,
        }
    }

    /// The encryption secret, read from its file.
    pub fn secret(&self) -> Result<Option<blockcache::Secret>, String> {
        secret_from(
            self.encryption_key_file.as_deref(),
            self.encryption_passphrase_file.as_deref(),
        )
    }

    /// Checks what no single setting's parser can: the sizes that must hold a block.
    pub fn check(&self) -> Result<(), String> {
        if let Some(level) = self.compression_level {
            if !matches!(self.compression.0, Compression::Zstd { .. }) {
                return Err(format!(
                    "--compression-level {level} is a zstd level, but --compression is {}",
                    self.compression.0
                ));
            }
            Compression::zstd(level).map_err(|e| format!("--compression-level: {e}"))?;
        }
        let block = self.block_size;
        for (key, size) in [
            ("max-cache-size", self.max_cache_size),
            ("max-dirty", self.max_dirty),
        ] {
            if size.0 < block.0 {
                return Err(format!(
                    "{key} {size} is out of range: it must be at least block-size ({block})"
                ));
            }
        }
        Ok(())
    }

    /// The cache directory, by default in the data directory `data_dir`.
    pub fn cache_dir(&self, data_dir: &Path) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("cache"))
    }

    /// The database URL, by default a file in the data directory `data_dir`.
    pub fn database(&self, data_dir: &Path) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("meta.db").display()))
    }

    /// The store URL, by default a directory in the data directory `data_dir`.
    pub fn store(&self, data_dir: &Path) -> String {
        match &self.store {
            // A plain path is a directory: `file://` with its absolute path.
            Some(s) if !s.contains("://") => {
                let path = std::path::absolute(s).unwrap_or_else(|_| PathBuf::from(s));
                format!("file://{}", path.display())
            }
            Some(s) => s.clone(),
            None => format!("file://{}", data_dir.join("store").display()),
        }
    }

    /// Whether the defaults put something in the data directory.
    pub fn uses_data_dir(&self) -> bool {
        self.database.is_none() || self.store.is_none()
    }

    /// Whether the address is one that other machines may reach while no token guards it,
    /// and `--insecure` does not allow that.
    pub fn exposed(&self) -> bool {
        !self.endpoint.listen.ip().is_loopback()
            && self.endpoint.auth_token.is_none()
            && !self.insecure
    }

    /// The long names of the settings: the keys a settings file may hold.
    fn keys() -> Vec<String> {
        Self::augment_args(clap::Command::new("settings"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }
}

/// What is wrong with the settings file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read settings file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("settings file {} is not valid TOML", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where and why.
        #[source]
        source: toml::de::Error,
    },
    /// A key names no setting.
    #[error("settings file {}: unknown key {key:?}; the keys are {}", path.display(), known.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Every key there is.
        known: Vec<String>,
    },
    /// A value is a table, an array, a float or a date.
    #[error("settings file {}: {key} holds a TOML {found}; write a string, an integer or a boolean", path.display())]
    Type {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The TOML type found.
        found: &'static str,
    },
    /// The setting's parser refused the value.
    #[error("settings file {}: bad value for {key}", path.display())]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The parser's error.
        #[source]
        source: BadValue,
    },
}

/// A value refused by a setting's parser: clap's error, told without its usage hints.
#[derive(Debug)]
pub struct BadValue(clap::Error);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        let value = match self.0.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(v)) => v.as_str(),
            _ => "",
        };
        if let Some(source) = std::error::Error::source(&self.0) {
            // Our parsers name the value; the standard ones (numbers) do not.
            let told = source.to_string();
            return if told.contains(value) {
                f.write_str(&told)
            } else {
                write!(f, "invalid value {value:?}: {told}")
            };
        }
        match (self.0.kind(), self.0.get(ContextKind::ValidValue)) {
            (ErrorKind::InvalidValue, Some(ContextValue::Strings(valid))) => write!(
                f,
                "invalid value {value:?}; allowed values: {}",
                valid.join(", ")
            ),
            _ => write!(f, "invalid value {value:?} ({:?})", self.0.kind()),
        }
    }
}

// Its message carries the parser's error: no source, so that it is not told twice.
impl std::error::Error for BadValue {}

/// Parses the command line of `C` with the `BLOCKCACHE_*` variables. When the subcommand has
/// a settings file, its values become the defaults of a second parse, so that clap takes a
/// value from the flag, else from the variable, else from the file, else the built-in
/// default. Usage errors and `--help` exit the process, as clap does.
pub fn parse<C: clap::Parser>() -> Result<C, SettingsError> {
    let matches = C::command().get_matches();
    let file = matches.subcommand().and_then(|(name, m)| {
        let path = m.try_get_one::<PathBuf>(CONFIG).ok().flatten()?;
        Some((name.to_owned(), path.clone()))
    });
    let matches = match file {
        None => matches,
        Some((name, path)) => {
            let cmd = C::command();
            let sub = cmd
                .find_subcommand(&name)
                .expect("the subcommand that was just parsed");
            let defaults = file_defaults(sub, &path)?;
            cmd.mut_subcommand(&name, |sub| {
                defaults.into_iter().fold(sub, |sub, (id, value)| {
                    sub.mut_arg(id, |a| a.default_value(value))
                })
            })
            .get_matches()
        }
    };
    Ok(C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

/// The values of the settings file at `path` for the arguments of `cmd`, checked by their
/// parsers. A key of a setting that `cmd` does not take (`block-size` for a client) is
/// skipped; a key of no setting is an error.
fn file_defaults(
    cmd: &clap::Command,
    path: &Path,
) -> Result<Vec<(clap::Id, &'static str)>, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| SettingsError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    let known = Settings::keys();
    let mut defaults = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(SettingsError::UnknownKey {
                path: path.to_owned(),
                key,
                known,
            });
        }
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            continue;
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(SettingsError::Type {
                    path: path.to_owned(),
                    key,
                    found: other.type_str(),
                });
            }
        };
        // The setting's own parser, run by clap on this argument alone, given the value
        // (a switch such as `--insecure` takes it as `true` or `false`).
        let check = clap::Command::new("settings file")
            .no_binary_name(true)
            .arg(arg.clone().action(clap::ArgAction::Set));
        if let Err(e) = check.try_get_matches_from([format!("--{key}={text}")]) {
            return Err(SettingsError::Value {
                path: path.to_owned(),
                key,
                source: BadValue(e),
            });
        }
        // Clap keeps defaults as `&'static str`; a settings file is read once per process.
        defaults.push((arg.get_id().clone(), &*Box::leak(text.into_boxed_str())));
    }
    Ok(defaults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    #[test]
    fn sizes_and_delays_print_what_parses_back() {
        for n in [
            0,
            1,
            1000,
            1 << 10,
            65_536,
            3 << 20,
            1 << 30,
            1 << 40,
            5 << 41,
        ] {
            let shown = Size(n).to_string();
            assert_eq!(shown.parse::<Size>(), Ok(Size(n)), "{shown}");
        }
        assert_eq!(Size(1 << 20).to_string(), "1MiB");
        for d in [
            None,
            Some(Duration::from_millis(1)),
            Some(Duration::from_secs(10)),
        ] {
            let shown = Delay(d).to_string();
            assert_eq!(shown.parse::<Delay>(), Ok(Delay(d)), "{shown}");
        }
        assert_eq!("0".parse::<Delay>(), Ok(Delay(None)));
    }

    #[test]
    fn every_setting_has_one_name_across_flag_variable_and_file() {
        let cmd = Settings::augment_args(clap::Command::new("settings"));
        for arg in cmd.get_arguments() {
            let long = arg.get_long().expect("every setting is a long flag");
            assert_eq!(arg.get_id().as_str(), long.replace('-', "_"), "{long}");
            let env = arg.get_env().expect("every setting has a variable");
            assert_eq!(
                env.to_str(),
                Some(format!("BLOCKCACHE_{}", long.replace('-', "_").to_uppercase()).as_str()),
                "{long}"
            );
        }
    }

    #[test]
    fn engine_settings_start_from_the_engine_defaults() {
        let cmd = Settings::augment_args(clap::Command::new("settings")).no_binary_name(true);
        let settings = Settings::from_arg_matches(&cmd.get_matches_from(Vec::<String>::new()))
            .expect("defaults parse");
        let ours = settings.engine_config(PathBuf::from("c"));
        let engine = Config::new("c");
        assert_eq!(
            (
                ours.block_size,
                ours.max_bytes,
                ours.max_entries,
                ours.max_dirty_bytes,
                ours.upload_tasks,
                ours.upload_delay
            ),
            (
                engine.block_size,
                engine.max_bytes,
                engine.max_entries,
                engine.max_dirty_bytes,
                engine.upload_tasks,
                engine.upload_delay
            )
        );
    }
}
