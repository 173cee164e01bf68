//! Settings: a TOML file (`--config`), then `BLOCKCACHE_*` environment variables, then flags;
//! a later source wins. Every value has an embedded default, so no settings at all run the
//! daemon on `./blockcache-data`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockcache::Durability;
use serde::Deserialize;

/// The port the daemon listens on by default (on 127.0.0.1).
pub const DEFAULT_PORT: u16 = 8640;

/// A secret that never shows in logs, errors or `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
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
        if s.is_empty() {
            return Err("the auth token must not be empty".into());
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
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?} ({e}); write a number of bytes with an optional unit such as 64KiB, 1MiB, 4GiB"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration ("10s", "500ms", "2min"); "0" or "off" where a delay can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay(pub Duration);

impl std::str::FromStr for Delay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s == "off" {
            return Ok(Delay(Duration::ZERO));
        }
        humantime::parse_duration(s).map(Delay).map_err(|e| {
            format!("invalid duration {s:?} ({e}); write for example 500ms, 10s, 2min, or off")
        })
    }
}

impl<'de> Deserialize<'de> for Delay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn durability_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Durability>, D::Error> {
    String::deserialize(d)?
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Settings as written in the TOML file and, with the same names, as flags (`--max-cache-size`)
/// and environment variables (`BLOCKCACHE_MAX_CACHE_SIZE`). Every field is optional.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Address to listen on (ADDR:PORT; port 0 picks a free one) [default: 127.0.0.1:8640]
    #[arg(long, env = "BLOCKCACHE_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Directory for the defaults of the database, cache and store [default: ./blockcache-data]
    #[arg(long, env = "BLOCKCACHE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cache directory [default: DATA_DIR/cache]
    #[arg(long, env = "BLOCKCACHE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Metadata database (sqlite://PATH or a path) [default: DATA_DIR/meta.db]
    #[arg(long, env = "BLOCKCACHE_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// Object store: file://, memory://, s3://, gs://, az:// [default: file://DATA_DIR/store]
    #[arg(long, env = "BLOCKCACHE_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Block size, fixed when the volume is created [default: 1MiB]
    #[arg(long, env = "BLOCKCACHE_BLOCK_SIZE", value_name = "SIZE")]
    pub block_size: Option<Size>,
    /// Most bytes the cache directory holds [default: 1GiB]
    #[arg(long, env = "BLOCKCACHE_MAX_CACHE_SIZE", value_name = "SIZE")]
    pub max_cache_size: Option<Size>,
    /// Most files the cache directory holds [default: 65536]
    #[arg(long, env = "BLOCKCACHE_MAX_ENTRIES", value_name = "N")]
    pub max_entries: Option<u64>,
    /// Most dirty bytes before writers wait [default: 256MiB]
    #[arg(long, env = "BLOCKCACHE_MAX_DIRTY", value_name = "SIZE")]
    pub max_dirty: Option<Size>,
    /// Concurrent uploads [default: 8]
    #[arg(long, env = "BLOCKCACHE_UPLOAD_TASKS", value_name = "N")]
    pub upload_tasks: Option<usize>,
    /// Age at which a dirty block is uploaded in the background; "off" disables [default: 10s]
    #[arg(long, env = "BLOCKCACHE_UPLOAD_DELAY", value_name = "DURATION")]
    pub upload_delay: Option<Delay>,
    /// Durability of writes when a request does not say: none, local or store [default: local]
    #[arg(long, env = "BLOCKCACHE_DURABILITY", value_name = "none|local|store")]
    #[serde(default, deserialize_with = "durability_de")]
    pub durability: Option<Durability>,
    /// Largest file size [default: 1TiB]
    #[arg(long, env = "BLOCKCACHE_MAX_FILE_SIZE", value_name = "SIZE")]
    pub max_file_size: Option<Size>,
    /// Memory for request buffers, all requests together (each PUT or PATCH holds one block,
    /// each GET up to four while sending); requests wait beyond it [default: 64MiB]
    #[arg(long, env = "BLOCKCACHE_BUFFER_MEMORY", value_name = "SIZE")]
    pub buffer_memory: Option<Size>,
    /// Bearer token every route but /healthz requires
    #[arg(
        long,
        env = "BLOCKCACHE_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<Secret>,
    /// Allow a non-loopback address without a token
    #[arg(long, env = "BLOCKCACHE_INSECURE")]
    #[serde(default)]
    pub insecure: bool,
    /// Log format
    #[arg(long, env = "BLOCKCACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter ("info", "debug", "blockcache=debug,warn") [default: info]
    #[arg(long, env = "BLOCKCACHE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

impl Settings {
    /// Reads a TOML settings file; unknown keys and bad values are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read settings file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("settings file {}: {e}", path.display()))
    }

    /// `self` with the fields it lacks taken from `base`.
    pub fn or(self, base: Settings) -> Settings {
        Settings {
            listen: self.listen.or(base.listen),
            data_dir: self.data_dir.or(base.data_dir),
            cache_dir: self.cache_dir.or(base.cache_dir),
            database: self.database.or(base.database),
            store: self.store.or(base.store),
            block_size: self.block_size.or(base.block_size),
            max_cache_size: self.max_cache_size.or(base.max_cache_size),
            max_entries: self.max_entries.or(base.max_entries),
            max_dirty: self.max_dirty.or(base.max_dirty),
            upload_tasks: self.upload_tasks.or(base.upload_tasks),
            upload_delay: self.upload_delay.or(base.upload_delay),
            durability: self.durability.or(base.durability),
            max_file_size: self.max_file_size.or(base.max_file_size),
            buffer_memory: self.buffer_memory.or(base.buffer_memory),
            auth_token: self.auth_token.or(base.auth_token),
            insecure: self.insecure || base.insecure,
            log_format: self.log_format.or(base.log_format),
            log_level: self.log_level.or(base.log_level),
        }
    }

    /// The address to listen on (or to reach a running daemon at).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("blockcache-data"))
    }

    /// Refuses a non-loopback address without a token (unless `insecure`).
    pub fn check_exposure(&self) -> Result<(), String> {
        let addr = self.listen_addr();
        if !addr.ip().is_loopback() && self.auth_token.is_none() && !self.insecure {
            return Err(format!(
                "refusing to listen on {addr} (not a loopback address) without an auth token; set --auth-token, or pass --insecure to allow it"
            ));
        }
        Ok(())
    }

    /// The default write durability.
    pub fn durability(&self) -> Durability {
        self.durability.unwrap_or_default()
    }

    /// The largest file size.
    pub fn max_file_size(&self) -> u64 {
        self.max_file_size.map_or(1 << 40, |s| s.0)
    }
}
