//! The object format: what a block looks like in the store.
//!
//! Every object starts with a small header, followed by the block, possibly compressed, possibly
//! encrypted and authenticated. Version 1:
//!
//! ```text
//! offset len field
//! 0      4   magic b"BCOB"
//! 4      1   format version = 1
//! 5      1   compression of the payload: 0 none, 1 zstd, 2 lz4 (none also when compressing
//!            did not shrink the block)
//! 6      1   encryption: 0 none, 1 XChaCha20-Poly1305
//! 7      1   reserved = 0
//! 8      8   plaintext length, u64 little-endian
//! 16     16  volume id
//! 32     8   object id, u64 little-endian
//! 40     24  nonce, only when encrypted: random per object
//! then       payload: the (possibly compressed) block; when encrypted, its AEAD ciphertext
//!            with the 16-byte tag appended
//! ```
//!
//! With encryption the associated data of the AEAD is the whole header including the nonce, so
//! the volume id, the object id, the plaintext length and the compression are authenticated: an
//! object from another volume or key, under another id, truncated or altered is an error, never
//! wrong data. Without encryption, [`ObjectCodec::decode`] still checks the volume id, the object
//! id and the length, but a changed payload byte goes unnoticed (there is nothing to check it
//! against).
//!
//! Keys come from a key file of exactly 32 raw bytes ([`Key::from_key_file`]) or from a
//! passphrase through argon2id ([`Kdf`]). [`Key::check_value`] gives a string to keep with the
//! volume so that a wrong key is recognised when the volume is opened, not at the first read.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::TryRng;
use zeroize::{Zeroize, Zeroizing};

/// The magic bytes every object starts with.
pub const MAGIC: [u8; 4] = *b"BCOB";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the fixed header (without the nonce).
pub const HEADER_LEN: usize = 40;
/// Length of the nonce that follows the header of an encrypted object.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag at the end of an encrypted object.
pub const TAG_LEN: usize = 16;
/// Length of a key.
pub const KEY_LEN: usize = 32;
/// Length of a [`Kdf`] salt.
pub const SALT_LEN: usize = 16;
/// The zstd level of [`Compression::default`].
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
const COMPRESSION_LZ4: u8 = 2;
const ENCRYPTION_NONE: u8 = 0;
const ENCRYPTION_XCHACHA: u8 = 1;

/// The associated data prefix of a key check value.
const CHECK_AAD: &[u8] = b"blockcache key check v1";

/// What is wrong with an object, a key or a format setting.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The object does not start with [`MAGIC`].
    #[error("not a blockcache object (bad magic)")]
    BadMagic,
    /// The object was written by a newer blockcache.
    #[error(
        "format version {found} is newer than this blockcache understands ({FORMAT_VERSION}): a newer blockcache wrote this object"
    )]
    NewerVersion {
        /// The version in the header.
        found: u8,
    },
    /// The version byte is 0, which no blockcache writes.
    #[error(
        "format version 0 is not a valid version (this blockcache understands {FORMAT_VERSION})"
    )]
    InvalidVersion,
    /// The reserved header byte is not zero.
    #[error("reserved header byte is {0}, not 0")]
    Reserved(u8),
    /// The compression code is not one this version knows.
    #[error("unknown compression code {0}")]
    UnknownCompression(u8),
    /// The encryption code is not one this version knows.
    #[error("unknown encryption code {0}")]
    UnknownEncryption(u8),
    /// The header names another volume.
    #[error(
        "object belongs to volume {}, not {}",
        hex::encode(found),
        hex::encode(expected)
    )]
    WrongVolume {
        /// The volume id in the header.
        found: [u8; 16],
        /// The volume id of this codec.
        expected: [u8; 16],
    },
    /// The header names another object.
    #[error("object claims id {found}, expected {expected}")]
    WrongObjectId {
        /// The object id in the header.
        found: u64,
        /// The id the object was read as.
        expected: u64,
    },
    /// The AEAD tag does not match.
    #[error("authentication failed: wrong key, or the object was altered or truncated")]
    AuthenticationFailed,
    /// The object is shorter than its header (and nonce and tag) need.
    #[error("truncated: the object is {len} bytes, its header needs at least {needed}")]
    Truncated {
        /// The object's length.
        len: usize,
        /// The least length that could be valid.
        needed: usize,
    },
    /// An uncompressed payload is not exactly as long as the header says, or a compressed one
    /// is not shorter.
    #[error("the payload is {found} bytes but the header says {expected} (truncated or extended)")]
    PayloadLength {
        /// The payload's length.
        found: usize,
        /// The plaintext length in the header.
        expected: u64,
    },
    /// The header's plaintext length is above the limit given to [`ObjectCodec::decode`].
    #[error("plaintext length {len} above the limit {max}")]
    TooLarge {
        /// The plaintext length in the header.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The compressed payload does not decompress to exactly the header's length.
    #[error("the {codec} payload does not decompress to the header's {expected} bytes: {reason}")]
    Decompress {
        /// `zstd` or `lz4`.
        codec: &'static str,
        /// The plaintext length in the header.
        expected: u64,
        /// What went wrong.
        reason: String,
    },
    /// Compressing failed (zstd could not set up its context).
    #[error("zstd compression failed: {0}")]
    Compress(String),
    /// The object is encrypted and no key is configured.
    #[error("encrypted object but no encryption key configured")]
    NoKey,
    /// The object is not encrypted but the volume is.
    #[error(
        "unencrypted object in an encrypted volume (refused: anyone with write access to the store could have planted it)"
    )]
    Unencrypted,
    /// A key check value does not match the key.
    #[error(
        "wrong encryption key for volume {}: the key check value does not match",
        hex::encode(volume)
    )]
    WrongKey {
        /// The volume id.
        volume: [u8; 16],
    },
    /// A key check value is not in the form [`Key::check_value`] gives.
    #[error("malformed key check value {value:?}: expected {} hex digits", 2 * (NONCE_LEN + TAG_LEN))]
    BadCheckValue {
        /// The value as given.
        value: String,
    },
    /// A key file could not be read or is not 32 bytes.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A passphrase file could not be read.
    #[error("passphrase file {path}: {reason}")]
    PassphraseFile {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The passphrase is empty.
    #[error("empty passphrase refused")]
    EmptyPassphrase,
    /// Key derivation parameters could not be parsed or are out of range.
    #[error("key derivation parameters {params:?}: {reason}")]
    BadKdf {
        /// The parameters as given.
        params: String,
        /// What was wrong.
        reason: String,
    },
    /// A compression name or level is not known.
    #[error("unknown compression {0:?} (expected none, zstd or lz4)")]
    BadCompressionName(String),
    /// A zstd level out of zstd's range.
    #[error("zstd level {level} outside {min}..={max}")]
    BadZstdLevel {
        /// The level given.
        level: i32,
        /// zstd's least level.
        min: i32,
        /// zstd's greatest level.
        max: i32,
    },
}

/// How the payload of new objects is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd at the given level.
    Zstd {
        /// The zstd level (see [`Compression::zstd`]).
        level: i32,
    },
    /// LZ4 block format.
    Lz4,
}

impl Compression {
    /// zstd at `level`, which must be in zstd's range (negative levels are the fast ones).
    pub fn zstd(level: i32) -> Result<Self, FormatError> {
        let range = zstd::compression_level_range();
        if range.contains(&level) {
            Ok(Compression::Zstd { level })
        } else {
            Err(FormatError::BadZstdLevel {
                level,
                min: *range.start(),
                max: *range.end(),
            })
        }
    }

    /// The name: `none`, `zstd` or `lz4`.
    pub fn name(&self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd { .. } => "zstd",
            Compression::Lz4 => "lz4",
        }
    }
}

impl Default for Compression {
    /// zstd level 1. On text-like 1 MiB blocks (release build, one core): level 1 encodes at
    /// about 235 MiB/s to a ratio of 3.12, level 3 at 166 MiB/s to 3.26, level 6 at 56 MiB/s to
    /// no better; all decode at 750-900 MiB/s. In `cargo xtask bench --only format` (two
    /// cores, encrypted), write+flush was 40 % faster at level 1 than at 3 for objects 4 %
    /// larger.
    fn default() -> Self {
        Compression::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl fmt::Display for Compression {
    /// The name only; the level of zstd is a separate setting.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = FormatError;

    /// `none`, `zstd` (at [`DEFAULT_ZSTD_LEVEL`]) or `lz4`.
    fn from_str(s: &str) -> Result<Self, FormatError> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::default()),
            "lz4" => Ok(Compression::Lz4),
            other => Err(FormatError::BadCompressionName(other.to_owned())),
        }
    }
}

/// A 256-bit encryption key. It is wiped from memory when dropped and never printed.
pub struct Key {
    /// Holds the key; wiped on drop (the `zeroize` feature of chacha20poly1305).
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key::from_zeroizing(Zeroizing::new(bytes))
    }

    fn from_zeroizing(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes[..]).expect("a 32-byte key");
        Key { cipher }
    }

    /// A random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut bytes[..]);
        Key::from_zeroizing(bytes)
    }

    /// Reads a key file: exactly 32 raw bytes.
    pub fn from_key_file(path: &Path) -> Result<Self, FormatError> {
        let key_file = |reason: String| FormatError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let contents = Zeroizing::new(std::fs::read(path).map_err(|e| key_file(e.to_string()))?);
        if contents.len() != KEY_LEN {
            return Err(key_file(format!(
                "is {} bytes, a key file holds exactly {KEY_LEN} raw bytes",
                contents.len()
            )));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&contents);
        Ok(Key::from_zeroizing(bytes))
    }

    /// The key of the passphrase in file `path` ([`read_passphrase_file`]) under `kdf`.
    pub fn from_passphrase_file(path: &Path, kdf: &Kdf) -> Result<Self, FormatError> {
        kdf.derive(&read_passphrase_file(path)?)
    }

    fn cipher(&self) -> &XChaCha20Poly1305 {
        &self.cipher
    }

    /// A value to keep with the volume that tells whether a key is the volume's
    /// ([`Key::verify`]): hex of a random nonce and the AEAD tag of the empty plaintext with
    /// associated data `b"blockcache key check v1"` and the volume id. It reveals nothing about
    /// the key.
    pub fn check_value(&self, volume: &[u8; 16]) -> String {
        let mut nonce = XNonce::default();
        fill_random(&mut nonce);
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce, &check_aad(volume), (&mut [][..]).into())
            .expect("an empty plaintext is never too long");
        let mut value = Vec::with_capacity(NONCE_LEN + TAG_LEN);
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&tag);
        hex::encode(value)
    }

    /// Whether this is the key that made `check_value` for `volume`.
    pub fn verify(&self, volume: &[u8; 16], check_value: &str) -> Result<(), FormatError> {
        let bad = || FormatError::BadCheckValue {
            value: check_value.to_owned(),
        };
        let raw = hex::decode(check_value).map_err(|_| bad())?;
        if raw.len() != NONCE_LEN + TAG_LEN {
            return Err(bad());
        }
        let (nonce, tag) = raw.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| bad())?;
        let tag = Tag::try_from(tag).map_err(|_| bad())?;
        self.cipher()
            .decrypt_inout_detached(&nonce, &check_aad(volume), (&mut [][..]).into(), &tag)
            .map_err(|_| FormatError::WrongKey { volume: *volume })
    }
}

fn check_aad(volume: &[u8; 16]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CHECK_AAD.len() + volume.len());
    aad.extend_from_slice(CHECK_AAD);
    aad.extend_from_slice(volume);
    aad
}

/// Fills `buf` from the operating system's generator (getrandom). Nonces and salts are rare
/// and small, so the system call costs nothing that matters.
fn fill_random(buf: &mut [u8]) {
    rand::rngs::SysRng
        .try_fill_bytes(buf)
        .expect("the operating system's random generator failed");
}

/// Reads a passphrase file: its contents less one trailing newline (`\n` or `\r\n`). An empty
/// passphrase is refused.
pub fn read_passphrase_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, FormatError> {
    let mut contents =
        Zeroizing::new(
            std::fs::read(path).map_err(|e| FormatError::PassphraseFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        );
    if contents.ends_with(b"\n") {
        contents.pop();
        if contents.ends_with(b"\r") {
            contents.pop();
        }
    }
    if contents.is_empty() {
        return Err(FormatError::PassphraseFile {
            path: path.display().to_string(),
            reason: "the passphrase is empty".to_owned(),
        });
    }
    Ok(contents)
}

/// Argon2id parameters that turn a passphrase into a [`Key`]. Kept with the volume as the string
/// of its `Display` (`argon2id:m=65536,t=3,p=1:salt=<32 hex digits>`), read back with `FromStr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kdf {
    /// Random per volume.
    pub salt: [u8; SALT_LEN],
    /// Memory in KiB.
    pub m_cost: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Kdf {
    /// Default memory: 64 MiB (RFC 9106's second recommendation, with one lane).
    pub const DEFAULT_M_COST: u32 = 64 * 1024;
    /// Default passes.
    pub const DEFAULT_T_COST: u32 = 3;
    /// Default lanes (argon2 here runs them one after the other, so more lanes buy nothing).
    pub const DEFAULT_P_COST: u32 = 1;

    /// The default costs with a random salt.
    pub fn new_random() -> Self {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt);
        Kdf {
            salt,
            m_cost: Self::DEFAULT_M_COST,
            t_cost: Self::DEFAULT_T_COST,
            p_cost: Self::DEFAULT_P_COST,
        }
    }

    fn params(&self) -> Result<argon2::Params, FormatError> {
        argon2::Params::new(self.m_cost, self.t_cost, self.p_cost, Some(KEY_LEN)).map_err(|e| {
            FormatError::BadKdf {
                params: self.to_string(),
                reason: e.to_string(),
            }
        })
    }

    /// The key of `passphrase` under these parameters. An empty passphrase is refused.
    pub fn derive(&self, passphrase: &[u8]) -> Result<Key, FormatError> {
        if passphrase.is_empty() {
            return Err(FormatError::EmptyPassphrase);
        }
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            self.params()?,
        );
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase, &self.salt, &mut bytes[..])
            .map_err(|e| FormatError::BadKdf {
                params: self.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Key::from_zeroizing(bytes))
    }
}

impl fmt::Display for Kdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "argon2id:m={},t={},p={}:salt={}",
            self.m_cost,
            self.t_cost,
            self.p_cost,
            hex::encode(self.salt)
        )
    }
}

impl FromStr for Kdf {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, FormatError> {
        let bad = |reason: &str| FormatError::BadKdf {
            params: s.to_owned(),
            reason: reason.to_owned(),
        };
        let expected = "expected argon2id:m=<KiB>,t=<passes>,p=<lanes>:salt=<32 hex digits>";
        let mut parts = s.split(':');
        let (Some("argon2id"), Some(costs), Some(salt), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(expected));
        };
        let mut costs = costs.split(',');
        let mut cost = |name: &str| -> Result<u32, FormatError> {
            costs
                .next()
                .and_then(|c| c.strip_prefix(name))
                .and_then(|c| c.strip_prefix('='))
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad(expected))
        };
        let (m_cost, t_cost, p_cost) = (cost("m")?, cost("t")?, cost("p")?);
        if costs.next().is_some() {
            return Err(bad(expected));
        }
        let salt = salt.strip_prefix("salt=").ok_or_else(|| bad(expected))?;
        let mut salt_bytes = [0u8; SALT_LEN];
        hex::decode_to_slice(salt, &mut salt_bytes).map_err(|_| bad(expected))?;
        let kdf = Kdf {
            salt: salt_bytes,
            m_cost,
            t_cost,
            p_cost,
        };
        kdf.params()?;
        Ok(kdf)
    }
}

/// The parsed fixed header.
struct Header {
    compression: u8,
    encryption: u8,
    plain_len: u64,
    volume: [u8; 16],
    object_id: u64,
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.compression);
        out.push(self.encryption);
        out.push(0);
        out.extend_from_slice(&self.plain_len.to_le_bytes());
        out.extend_from_slice(&self.volume);
        out.extend_from_slice(&self.object_id.to_le_bytes());
    }

    fn parse(stored: &[u8]) -> Result<Header, FormatError> {
        let Some(h) = stored.first_chunk::<HEADER_LEN>() else {
            return Err(FormatError::Truncated {
                len: stored.len(),
                needed: HEADER_LEN,
            });
        };
        if h[0..4] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        match h[4] {
            FORMAT_VERSION => {}
            0 => return Err(FormatError::InvalidVersion),
            found => return Err(FormatError::NewerVersion { found }),
        }
        let header = Header {
            compression: h[5],
            encryption: h[6],
            plain_len: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
            volume: h[16..32].try_into().expect("16 bytes"),
            object_id: u64::from_le_bytes(h[32..40].try_into().expect("8 bytes")),
        };
        if !matches!(
            header.compression,
            COMPRESSION_NONE | COMPRESSION_ZSTD | COMPRESSION_LZ4
        ) {
            return Err(FormatError::UnknownCompression(header.compression));
        }
        if !matches!(header.encryption, ENCRYPTION_NONE | ENCRYPTION_XCHACHA) {
            return Err(FormatError::UnknownEncryption(header.encryption));
        }
        if h[7] != 0 {
            return Err(FormatError::Reserved(h[7]));
        }
        Ok(header)
    }
}

/// Turns blocks into stored objects and back, for one volume.
#[derive(Debug, Clone)]
pub struct ObjectCodec {
    volume: [u8; 16],
    compression: Compression,
    key: Option<Arc<Key>>,
}

impl ObjectCodec {
    /// A codec for the volume `volume` that compresses new objects with `compression` and, with
    /// a key, encrypts them. With a key, decoding refuses unencrypted objects.
    pub fn new(volume: [u8; 16], compression: Compression, key: Option<Arc<Key>>) -> Self {
        ObjectCodec {
            volume,
            compression,
            key,
        }
    }

    /// The volume id.
    pub fn volume(&self) -> &[u8; 16] {
        &self.volume
    }

    /// The compression of new objects.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Whether objects are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// This codec with another compression (same volume and key).
    pub fn with_compression(&self, compression: Compression) -> Self {
        Self {
            compression,
            ..self.clone()
        }
    }

    /// No compression and no encryption: the payload is the block as is (after the header).
    pub fn is_identity(&self) -> bool {
        self.compression == Compression::None && self.key.is_none()
    }

    /// The stored object of block `plaintext` as object `object_id`. The block is stored
    /// uncompressed when compressing does not make it smaller.
    pub fn encode(&self, object_id: u64, plaintext: &[u8]) -> Result<Vec<u8>, FormatError> {
        let prefix = HEADER_LEN + if self.key.is_some() { NONCE_LEN } else { 0 };
        let tag_len = if self.key.is_some() { TAG_LEN } else { 0 };
        let bound = match self.compression {
            Compression::None => 0,
            Compression::Zstd { .. } => zstd::zstd_safe::compress_bound(plaintext.len()),
            Compression::Lz4 => lz4_flex::block::get_maximum_output_size(plaintext.len()),
        };
        let payload_room = bound.max(plaintext.len());
        let mut out = Vec::with_capacity(prefix + payload_room + tag_len);
        let header = Header {
            compression: COMPRESSION_NONE,
            encryption: if self.key.is_some() {
                ENCRYPTION_XCHACHA
            } else {
                ENCRYPTION_NONE
            },
            plain_len: plaintext.len() as u64,
            volume: self.volume,
            object_id,
        };
        header.write(&mut out);
        let mut nonce = XNonce::default();
        if self.key.is_some() {
            fill_random(&mut nonce);
            out.extend_from_slice(&nonce);
        }

        // Compress straight into the output, after the header.
        let compressed_len = match self.compression {
            Compression::None => None,
            Compression::Zstd { level } => {
                out.resize(prefix + bound, 0);
                let mut compressor = zstd::bulk::Compressor::new(level)
                    .map_err(|e| FormatError::Compress(e.to_string()))?;
                let n = compressor
                    .compress_to_buffer(plaintext, &mut out[prefix..])
                    .map_err(|e| FormatError::Compress(e.to_string()))?;
                Some((n, COMPRESSION_ZSTD))
            }
            Compression::Lz4 => {
                out.resize(prefix + bound, 0);
                let n = lz4_flex::block::compress_into(plaintext, &mut out[prefix..])
                    .expect("the output has lz4's maximum output size");
                Some((n, COMPRESSION_LZ4))
            }
        };
        match compressed_len {
            Some((n, code)) if n < plaintext.len() => {
                out.truncate(prefix + n);
                out[5] = code;
            }
            _ => {
                out.truncate(prefix);
                out.extend_from_slice(plaintext);
            }
        }

        if let Some(key) = &self.key {
            let (aad, payload) = out.split_at_mut(prefix);
            let tag = key
                .cipher()
                .encrypt_inout_detached(&nonce, aad, payload.into())
                .expect("a block is far below XChaCha20-Poly1305's message limit");
            out.extend_from_slice(&tag);
        }
        Ok(out)
    }

    /// The block stored as `stored`, read as object `object_id`. A header that claims more than
    /// `max_plain` bytes is refused before anything is allocated.
    pub fn decode(
        &self,
        object_id: u64,
        stored: &[u8],
        max_plain: u64,
    ) -> Result<Vec<u8>, FormatError> {
        let header = self.check_header(object_id, stored, max_plain)?;
        let plain_len = header.plain_len as usize;
        let Some(key) = &self.key else {
            let payload = &stored[HEADER_LEN..];
            return decompress(header.compression, payload, plain_len);
        };

        let prefix = HEADER_LEN + NONCE_LEN;
        if stored.len() < prefix + TAG_LEN {
            return Err(FormatError::Truncated {
                len: stored.len(),
                needed: prefix + TAG_LEN,
            });
        }
        let (aad, rest) = stored.split_at(prefix);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        // An uncompressed payload must be exactly the block; checking before decrypting keeps a
        // wrong length from allocating more than the header allows.
        if header.compression == COMPRESSION_NONE && ciphertext.len() != plain_len {
            return Err(FormatError::AuthenticationFailed);
        }
        let nonce = XNonce::try_from(&aad[HEADER_LEN..]).expect("24 bytes");
        let tag = Tag::try_from(tag).expect("16 bytes");
        let mut payload = ciphertext.to_vec();
        key.cipher()
            .decrypt_inout_detached(&nonce, aad, payload.as_mut_slice().into(), &tag)
            .map_err(|_| FormatError::AuthenticationFailed)?;
        if header.compression == COMPRESSION_NONE {
            return Ok(payload);
        }
        let plain = decompress(header.compression, &payload, plain_len);
        payload.zeroize();
        plain
    }

    /// The header of `stored` if it is one this codec may decode as object `object_id`.
    fn check_header(
        &self,
        object_id: u64,
        stored: &[u8],
        max_plain: u64,
    ) -> Result<Header, FormatError> {
        let header = Header::parse(stored)?;
        if header.volume != self.volume {
            return Err(FormatError::WrongVolume {
                found: header.volume,
                expected: self.volume,
            });
        }
        if header.object_id != object_id {
            return Err(FormatError::WrongObjectId {
                found: header.object_id,
                expected: object_id,
            });
        }
        if header.plain_len > max_plain || usize::try_from(header.plain_len).is_err() {
            return Err(FormatError::TooLarge {
                len: header.plain_len,
                max: max_plain,
            });
        }
        let encrypted = header.encryption == ENCRYPTION_XCHACHA;
        match (&self.key, encrypted) {
            (None, true) => Err(FormatError::NoKey),
            (Some(_), false) => Err(FormatError::Unencrypted),
            _ => Ok(header),
        }
    }

    /// Like [`ObjectCodec::decode`], but an object that is neither compressed nor encrypted
    /// comes back as a slice of `stored`, without a copy.
    pub fn decode_bytes(
        &self,
        object_id: u64,
        stored: Bytes,
        max_plain: u64,
    ) -> Result<Bytes, FormatError> {
        let header = self.check_header(object_id, &stored, max_plain)?;
        if self.key.is_none() && header.compression == COMPRESSION_NONE {
            let found = stored.len() - HEADER_LEN;
            if found as u64 != header.plain_len {
                return Err(FormatError::PayloadLength {
                    found,
                    expected: header.plain_len,
                });
            }
            return Ok(stored.slice(HEADER_LEN..));
        }
        self.decode(object_id, &stored, max_plain).map(Bytes::from)
    }
}

/// The block of `payload`, which must be exactly `plain_len` bytes once decompressed; never
/// allocates or writes more than that.
fn decompress(compression: u8, payload: &[u8], plain_len: usize) -> Result<Vec<u8>, FormatError> {
    let mismatch = |codec, reason: String| FormatError::Decompress {
        codec,
        expected: plain_len as u64,
        reason,
    };
    match compression {
        COMPRESSION_NONE => {
            if payload.len() != plain_len {
                return Err(FormatError::PayloadLength {
                    found: payload.len(),
                    expected: plain_len as u64,
                });
            }
            Ok(payload.to_vec())
        }
        // The encoder stores a block compressed only when that makes it smaller.
        _ if payload.len() >= plain_len => Err(FormatError::PayloadLength {
            found: payload.len(),
            expected: plain_len as u64,
        }),
        COMPRESSION_ZSTD => {
            let mut out = Vec::with_capacity(plain_len);
            let mut decompressor =
                zstd::bulk::Decompressor::new().map_err(|e| mismatch("zstd", e.to_string()))?;
            let n = decompressor
                .decompress_to_buffer(payload, &mut out)
                .map_err(|e| mismatch("zstd", e.to_string()))?;
            if n != plain_len {
                return Err(mismatch("zstd", format!("it decompresses to {n}")));
            }
            Ok(out)
        }
        COMPRESSION_LZ4 => {
            let mut out = vec![0u8; plain_len];
            let n = lz4_flex::block::decompress_into(payload, &mut out)
                .map_err(|e| mismatch("lz4", e.to_string()))?;
            if n != plain_len {
                return Err(mismatch("lz4", format!("it decompresses to {n}")));
            }
            Ok(out)
        }
        other => Err(FormatError::UnknownCompression(other)),
    }
}

#[cfg(test)]
mod tests;
