//! Tests of the object format: round trips, every refusal, the key check and the KDF.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use rand::{Rng, RngExt, SeedableRng};

use super::*;

const VOLUME: [u8; 16] = *b"volume-id-012345";
const OTHER_VOLUME: [u8; 16] = *b"another-volume-0";
const MAX: u64 = 4 << 20;
/// Larger than a zstd block (128 KiB) and small enough for the unoptimised AEAD of debug builds.
const BIG: usize = 300_000;

/// Text-like data that zstd compresses about 3:1: words from a small vocabulary with numbers.
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "block", "cache", "object", "store", "the", "of", "volume", "write", "read", "evict",
        "dirty", "clean", "upload", "segment", "header", "nonce", "and", "a", "to", "is", "with",
        "for", "metadata", "sqlite",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        out.extend_from_slice(word.as_bytes());
        if rng.random_range(0..4) == 0 {
            out.extend_from_slice(format!(" {}", rng.random_range(0..100_000u32)).as_bytes());
        }
        out.push(if rng.random_range(0..12) == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

fn key() -> Arc<Key> {
    Arc::new(Key::from_bytes([7u8; KEY_LEN]))
}

fn compressions() -> [Compression; 4] {
    [
        Compression::None,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
        Compression::Lz4,
    ]
}

fn codecs() -> Vec<ObjectCodec> {
    let mut codecs = Vec::new();
    for compression in compressions() {
        codecs.push(ObjectCodec::new(VOLUME, compression, None));
        codecs.push(ObjectCodec::new(VOLUME, compression, Some(key())));
    }
    codecs
}

fn prefix(codec: &ObjectCodec) -> usize {
    HEADER_LEN + if codec.is_encrypted() { NONCE_LEN } else { 0 }
}

#[test]
fn round_trips_every_compression_and_encryption() {
    let blocks = [
        Vec::new(),
        vec![42u8],
        text(BIG, 1),
        random(BIG, 2),
        text(4096, 3),
        random(4096, 4),
    ];
    for codec in codecs() {
        for (i, block) in blocks.iter().enumerate() {
            let stored = codec.encode(i as u64, block).unwrap();
            assert_eq!(&stored[0..4], b"BCOB");
            assert_eq!(stored[4], FORMAT_VERSION);
            assert_eq!(stored[6], u8::from(codec.is_encrypted()));
            assert_eq!(
                u64::from_le_bytes(stored[8..16].try_into().unwrap()),
                block.len() as u64
            );
            assert_eq!(stored[16..32], VOLUME);
            assert_eq!(
                u64::from_le_bytes(stored[32..40].try_into().unwrap()),
                i as u64
            );
            let back = codec.decode(i as u64, &stored, MAX).unwrap();
            assert!(back == *block, "{codec:?} block {i}");
            let stored = bytes::Bytes::from(stored);
            let back = codec.decode_bytes(i as u64, stored.clone(), MAX).unwrap();
            assert!(back == *block, "{codec:?} block {i}");
            if codec.is_identity() {
                assert_eq!(back.as_ptr(), stored[HEADER_LEN..].as_ptr(), "not copied");
            }
        }
    }
}

#[test]
fn compressible_data_is_compressed_and_incompressible_stored_as_is() {
    for codec in codecs() {
        let tag = if codec.is_encrypted() { TAG_LEN } else { 0 };
        let block = text(BIG, 5);
        let stored = codec.encode(1, &block).unwrap();
        match codec.compression() {
            Compression::None => {
                assert_eq!(stored[5], 0);
                assert_eq!(stored.len(), prefix(&codec) + block.len() + tag);
            }
            Compression::Zstd { .. } => {
                assert_eq!(stored[5], 1);
                assert!(
                    stored.len() < block.len() / 2,
                    "{codec:?}: {}",
                    stored.len()
                );
            }
            Compression::Lz4 => {
                assert_eq!(stored[5], 2);
                assert!(
                    stored.len() < block.len() * 2 / 3,
                    "{codec:?}: {}",
                    stored.len()
                );
            }
        }
        for block in [random(BIG, 6), Vec::new(), vec![1u8]] {
            let stored = codec.encode(1, &block).unwrap();
            assert_eq!(
                stored[5], 0,
                "{codec:?} stored incompressible data compressed"
            );
            assert_eq!(stored.len(), prefix(&codec) + block.len() + tag);
            assert_eq!(codec.decode(1, &stored, MAX).unwrap(), block);
        }
    }
}

#[test]
fn identity_and_encryption_flags() {
    assert!(ObjectCodec::new(VOLUME, Compression::None, None).is_identity());
    assert!(!ObjectCodec::new(VOLUME, Compression::Lz4, None).is_identity());
    assert!(!ObjectCodec::new(VOLUME, Compression::None, Some(key())).is_identity());
}

#[test]
fn every_header_byte_flipped_is_an_error() {
    for codec in codecs() {
        for block in [text(10_000, 7), random(3000, 8), Vec::new()] {
            let stored = codec.encode(9, &block).unwrap();
            for i in 0..prefix(&codec) {
                for bit in [0x01u8, 0x80] {
                    let mut bad = stored.clone();
                    bad[i] ^= bit;
                    let result = codec.decode(9, &bad, MAX);
                    assert!(
                        result.is_err(),
                        "{codec:?}: byte {i} ^ {bit:#x} went unnoticed"
                    );
                }
            }
        }
    }
}

#[test]
fn header_errors_say_what_is_wrong() {
    let codec = ObjectCodec::new(VOLUME, Compression::default(), Some(key()));
    let stored = codec.encode(3, &text(5000, 9)).unwrap();
    let with = |i: usize, v: u8| {
        let mut bad = stored.clone();
        bad[i] = v;
        codec.decode(3, &bad, MAX).unwrap_err()
    };
    assert!(matches!(with(0, b'X'), FormatError::BadMagic));
    assert_eq!(
        with(0, b'X').to_string(),
        "not a blockcache object (bad magic)"
    );
    let newer = with(4, 7);
    assert!(matches!(newer, FormatError::NewerVersion { found: 7 }));
    assert!(
        newer
            .to_string()
            .starts_with("format version 7 is newer than this blockcache understands (1)")
    );
    assert!(matches!(with(4, 0), FormatError::InvalidVersion));
    assert!(matches!(with(5, 9), FormatError::UnknownCompression(9)));
    assert!(matches!(with(6, 2), FormatError::UnknownEncryption(2)));
    assert!(matches!(with(7, 1), FormatError::Reserved(1)));
    assert!(matches!(with(6, 0), FormatError::Unencrypted));
    // The compression, the length and the nonce are authenticated.
    assert!(matches!(with(5, 2), FormatError::AuthenticationFailed));
    assert!(matches!(
        with(8, stored[8] ^ 1),
        FormatError::AuthenticationFailed
    ));
    assert!(matches!(
        with(50, stored[50] ^ 1),
        FormatError::AuthenticationFailed
    ));
    assert!(matches!(
        with(16, stored[16] ^ 1),
        FormatError::WrongVolume { .. }
    ));
    assert!(matches!(
        with(32, stored[32] ^ 1),
        FormatError::WrongObjectId {
            found: 2,
            expected: 3
        }
    ));
}

#[test]
fn every_payload_byte_flipped_in_an_encrypted_object_is_an_error() {
    for compression in compressions() {
        let codec = ObjectCodec::new(VOLUME, compression, Some(key()));
        let stored = codec.encode(1, &text(2000, 10)).unwrap();
        for i in prefix(&codec)..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x20;
            assert!(
                matches!(
                    codec.decode(1, &bad, MAX),
                    Err(FormatError::AuthenticationFailed)
                ),
                "{compression:?}: byte {i}"
            );
        }
    }
}

#[test]
fn truncated_or_extended_objects_are_errors() {
    for codec in codecs() {
        for block in [text(100_000, 11), random(5000, 12), vec![3u8]] {
            let stored = codec.encode(4, &block).unwrap();
            let mut cuts = vec![
                0,
                1,
                4,
                8,
                HEADER_LEN - 1,
                HEADER_LEN,
                HEADER_LEN + 1,
                stored.len() - 1,
            ];
            cuts.extend([
                HEADER_LEN + NONCE_LEN,
                HEADER_LEN + NONCE_LEN + TAG_LEN - 1,
                stored.len() / 2,
            ]);
            for cut in cuts.into_iter().filter(|&c| c < stored.len()) {
                let result = codec.decode(4, &stored[..cut], MAX);
                assert!(
                    result.is_err(),
                    "{codec:?} cut at {cut} of {}",
                    stored.len()
                );
                let cut_bytes = bytes::Bytes::copy_from_slice(&stored[..cut]);
                assert!(
                    codec.decode_bytes(4, cut_bytes, MAX).is_err(),
                    "{codec:?} cut at {cut}"
                );
            }
            let mut longer = stored.clone();
            longer.push(0);
            assert!(
                codec.decode(4, &longer, MAX).is_err(),
                "{codec:?} one byte appended"
            );
            assert!(
                codec.decode_bytes(4, longer.into(), MAX).is_err(),
                "{codec:?} one byte appended"
            );
        }
        let short = codec.decode(4, &[0u8; 10], MAX).unwrap_err();
        assert!(
            matches!(
                short,
                FormatError::Truncated {
                    len: 10,
                    needed: HEADER_LEN
                }
            ),
            "{short}"
        );
    }
}

#[test]
fn an_object_of_another_volume_or_id_is_refused() {
    for codec in codecs() {
        let block = text(3000, 13);
        let stored = codec.encode(5, &block).unwrap();
        let err = codec.decode(6, &stored, MAX).unwrap_err();
        assert_eq!(err.to_string(), "object claims id 5, expected 6");
        let other = ObjectCodec::new(OTHER_VOLUME, codec.compression(), codec.key.clone());
        let err = other.decode(5, &stored, MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "object belongs to volume {}, not {}",
                hex::encode(VOLUME),
                hex::encode(OTHER_VOLUME)
            )
        );
        // Rewriting the header's id to the asked one: caught by authentication when encrypted.
        let mut replayed = stored.clone();
        replayed[32..40].copy_from_slice(&6u64.to_le_bytes());
        let result = codec.decode(6, &replayed, MAX);
        if codec.is_encrypted() {
            assert!(matches!(result, Err(FormatError::AuthenticationFailed)));
        } else {
            assert_eq!(
                result.unwrap(),
                block,
                "without encryption the id is a consistency check only"
            );
        }
        // Rewriting the volume: likewise.
        let mut moved = stored.clone();
        moved[16..32].copy_from_slice(&OTHER_VOLUME);
        if codec.is_encrypted() {
            assert!(matches!(
                other.decode(5, &moved, MAX),
                Err(FormatError::AuthenticationFailed)
            ));
        }
    }
}

#[test]
fn wrong_key_no_key_and_plain_objects_in_an_encrypted_volume() {
    for compression in compressions() {
        let encrypted = ObjectCodec::new(VOLUME, compression, Some(key()));
        let other_key = ObjectCodec::new(
            VOLUME,
            compression,
            Some(Arc::new(Key::from_bytes([8u8; KEY_LEN]))),
        );
        let plain = ObjectCodec::new(VOLUME, compression, None);
        let block = text(10_000, 14);
        let stored = encrypted.encode(1, &block).unwrap();
        let err = other_key.decode(1, &stored, MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "authentication failed: wrong key, or the object was altered or truncated"
        );
        let err = plain.decode(1, &stored, MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "encrypted object but no encryption key configured"
        );
        let planted = plain.encode(1, &block).unwrap();
        let err = encrypted.decode(1, &planted, MAX).unwrap_err();
        assert!(matches!(err, FormatError::Unencrypted), "{err}");
        assert!(
            err.to_string()
                .starts_with("unencrypted object in an encrypted volume")
        );
    }
}

#[test]
fn a_length_above_the_limit_is_refused_before_allocating() {
    for codec in codecs() {
        let block = text(10_000, 15);
        let stored = codec.encode(1, &block).unwrap();
        assert!(codec.decode(1, &stored, 10_000).is_ok());
        let err = codec.decode(1, &stored, 9_999).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plaintext length 10000 above the limit 9999"
        );
        // A header claiming 2^63 bytes is refused, not allocated.
        let mut huge = stored.clone();
        huge[8..16].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(matches!(
            codec.decode(1, &huge, MAX),
            Err(FormatError::TooLarge { .. })
        ));
    }
}

#[test]
fn decompression_is_bounded_by_the_header_length() {
    // A plain volume (nothing authenticates the header): claim a shorter length than the
    // payload decompresses to; decompression must stop, not grow the buffer.
    for compression in [Compression::Zstd { level: 3 }, Compression::Lz4] {
        let codec = ObjectCodec::new(VOLUME, compression, None);
        let block = text(100_000, 16);
        let stored = codec.encode(1, &block).unwrap();
        for claimed in [0u64, 1, 1000, 99_999] {
            let mut lying = stored.clone();
            lying[8..16].copy_from_slice(&claimed.to_le_bytes());
            let err = codec.decode(1, &lying, MAX).unwrap_err();
            if claimed as usize <= stored.len() - HEADER_LEN {
                // A compressed payload is always shorter than its block.
                assert!(
                    matches!(err, FormatError::PayloadLength { .. }),
                    "{compression:?} claimed {claimed}: {err}"
                );
            } else {
                assert!(
                    matches!(err, FormatError::Decompress { .. }),
                    "{compression:?} claimed {claimed}: {err}"
                );
            }
        }
        let mut longer = stored.clone();
        longer[8..16].copy_from_slice(&100_001u64.to_le_bytes());
        assert!(matches!(
            codec.decode(1, &longer, MAX),
            Err(FormatError::Decompress { .. })
        ));
    }
    // An uncompressed payload must be exactly the header's length.
    let codec = ObjectCodec::new(VOLUME, Compression::None, None);
    let mut stored = codec.encode(1, b"hello").unwrap();
    stored[8] = 4;
    let err = codec.decode(1, &stored, MAX).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the payload is 5 bytes but the header says 4 (truncated or extended)"
    );
}

#[test]
fn two_encodings_of_the_same_block_differ_in_nonce() {
    let codec = ObjectCodec::new(VOLUME, Compression::default(), Some(key()));
    let block = text(4096, 17);
    let a = codec.encode(1, &block).unwrap();
    let b = codec.encode(1, &block).unwrap();
    assert_eq!(a[..HEADER_LEN], b[..HEADER_LEN]);
    assert_ne!(
        a[HEADER_LEN..HEADER_LEN + NONCE_LEN],
        b[HEADER_LEN..HEADER_LEN + NONCE_LEN]
    );
    assert_ne!(a[HEADER_LEN + NONCE_LEN..], b[HEADER_LEN + NONCE_LEN..]);
    assert_eq!(
        codec.decode(1, &a, MAX).unwrap(),
        codec.decode(1, &b, MAX).unwrap()
    );
}

#[test]
fn key_check_value_accepts_the_key_and_refuses_others() {
    let key = Key::generate();
    let value = key.check_value(&VOLUME);
    assert_eq!(value.len(), 2 * (NONCE_LEN + TAG_LEN));
    key.verify(&VOLUME, &value).unwrap();
    assert_ne!(value, key.check_value(&VOLUME), "a random nonce each time");
    let err = Key::generate().verify(&VOLUME, &value).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "wrong encryption key for volume {}: the key check value does not match",
            hex::encode(VOLUME)
        )
    );
    assert!(matches!(
        key.verify(&OTHER_VOLUME, &value),
        Err(FormatError::WrongKey { .. })
    ));
    for bad in ["", "zz", &value[..value.len() - 2], &format!("{value}00")] {
        assert!(
            matches!(
                key.verify(&VOLUME, bad),
                Err(FormatError::BadCheckValue { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn key_debug_does_not_print_the_key() {
    let key = Arc::new(Key::from_bytes([0xab; KEY_LEN]));
    let debug = format!(
        "{key:?} {:?}",
        ObjectCodec::new(VOLUME, Compression::None, Some(key.clone()))
    );
    assert!(!debug.contains("ab") && !debug.contains("171"), "{debug}");
}

#[test]
fn key_file_is_exactly_32_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, [5u8; 32]).unwrap();
    let key = Key::from_key_file(&path).unwrap();
    assert!(same(&key, &Key::from_bytes([5u8; 32])));
    for len in [0, 31, 33, 65] {
        std::fs::write(&path, vec![5u8; len]).unwrap();
        let err = Key::from_key_file(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("is {len} bytes, a key file holds exactly 32")),
            "{err}"
        );
    }
    let err = Key::from_key_file(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, FormatError::KeyFile { .. }), "{err}");
}

/// Whether two keys are the same: one verifies the other's check value.
fn same(a: &Key, b: &Key) -> bool {
    b.verify(&VOLUME, &a.check_value(&VOLUME)).is_ok()
}

/// Cheap parameters for tests: the defaults take a good fraction of a second in debug builds.
fn cheap_kdf(salt: u8) -> Kdf {
    Kdf {
        salt: [salt; SALT_LEN],
        m_cost: 64,
        t_cost: 1,
        p_cost: 1,
    }
}

#[test]
fn passphrase_kdf_is_deterministic_per_salt_and_params() {
    let kdf = cheap_kdf(1);
    let a = kdf.derive(b"correct horse").unwrap();
    let b = kdf.derive(b"correct horse").unwrap();
    assert!(same(&a, &b));
    assert!(!same(&a, &kdf.derive(b"correct horse!").unwrap()));
    assert!(!same(&a, &cheap_kdf(2).derive(b"correct horse").unwrap()));
    let slower = Kdf {
        t_cost: 2,
        ..cheap_kdf(1)
    };
    assert!(!same(&a, &slower.derive(b"correct horse").unwrap()));
    assert!(matches!(kdf.derive(b""), Err(FormatError::EmptyPassphrase)));
    // Through the string kept with the volume.
    let again: Kdf = kdf.to_string().parse().unwrap();
    assert_eq!(again, kdf);
    assert!(same(&again.derive(b"correct horse").unwrap(), &a));
}

#[test]
fn kdf_params_round_trip_as_a_string() {
    let kdf = Kdf::new_random();
    assert_eq!(
        (kdf.m_cost, kdf.t_cost, kdf.p_cost),
        (
            Kdf::DEFAULT_M_COST,
            Kdf::DEFAULT_T_COST,
            Kdf::DEFAULT_P_COST
        )
    );
    assert_ne!(kdf.salt, Kdf::new_random().salt);
    let s = kdf.to_string();
    assert!(s.starts_with("argon2id:m=65536,t=3,p=1:salt="), "{s}");
    assert_eq!(s.parse::<Kdf>().unwrap(), kdf);
    for bad in [
        "",
        "argon2i:m=65536,t=3,p=1:salt=00000000000000000000000000000000",
        "argon2id:m=65536,t=3:salt=00000000000000000000000000000000",
        "argon2id:m=65536,t=3,p=1,x=2:salt=00000000000000000000000000000000",
        "argon2id:m=65536,t=3,p=1:salt=0000",
        "argon2id:m=65536,t=3,p=1:salt=zz000000000000000000000000000000",
        "argon2id:m=1,t=3,p=1:salt=00000000000000000000000000000000",
        "argon2id:m=65536,t=0,p=1:salt=00000000000000000000000000000000",
        "argon2id:m=65536,t=3,p=1:salt=00000000000000000000000000000000:more",
    ] {
        let err = bad.parse::<Kdf>().unwrap_err();
        assert!(matches!(err, FormatError::BadKdf { .. }), "{bad:?}: {err}");
    }
}

#[test]
fn passphrase_file_loses_its_trailing_newline_and_must_not_be_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pass");
    for (contents, expected) in [
        (&b"secret\n"[..], &b"secret"[..]),
        (b"secret\r\n", b"secret"),
        (b"secret", b"secret"),
        (b"two\n\n", b"two\n"),
    ] {
        std::fs::write(&path, contents).unwrap();
        assert_eq!(read_passphrase_file(&path).unwrap().as_slice(), expected);
    }
    for empty in [&b""[..], b"\n", b"\r\n"] {
        std::fs::write(&path, empty).unwrap();
        let err = read_passphrase_file(&path).unwrap_err();
        assert!(
            err.to_string().ends_with("the passphrase is empty"),
            "{err}"
        );
    }
    assert!(matches!(
        read_passphrase_file(&dir.path().join("missing")),
        Err(FormatError::PassphraseFile { .. })
    ));
    std::fs::write(&path, b"secret\n").unwrap();
    let kdf = cheap_kdf(3);
    let from_file = Key::from_passphrase_file(&path, &kdf).unwrap();
    assert!(same(&from_file, &kdf.derive(b"secret").unwrap()));
}

#[test]
fn compression_names() {
    for (name, compression) in [
        ("none", Compression::None),
        (
            "zstd",
            Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
        ),
        ("lz4", Compression::Lz4),
    ] {
        assert_eq!(name.parse::<Compression>().unwrap(), compression);
        assert_eq!(compression.to_string(), name);
    }
    assert_eq!(Compression::default(), Compression::Zstd { level: 1 });
    let err = "gzip".parse::<Compression>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown compression \"gzip\" (expected none, zstd or lz4)"
    );
    assert_eq!(
        Compression::zstd(19).unwrap(),
        Compression::Zstd { level: 19 }
    );
    assert!(Compression::zstd(-5).is_ok());
    assert!(matches!(
        Compression::zstd(23),
        Err(FormatError::BadZstdLevel { level: 23, .. })
    ));
}

proptest! {
    #[test]
    fn proptest_round_trip(
        block in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..5000),
            proptest::collection::vec(0u8..4, 0..5000),
        ],
        id in any::<u64>(),
        which in 0usize..8,
    ) {
        let codec = &codecs()[which];
        let stored = codec.encode(id, &block).unwrap();
        prop_assert_eq!(codec.decode(id, &stored, block.len() as u64).unwrap(), block);
    }

    /// Garbage after a valid header never panics and never returns more than the limit.
    #[test]
    fn proptest_garbage_payload_is_an_error_or_bounded(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        compression in 0u8..3,
        len in 0u64..1000,
    ) {
        let codec = ObjectCodec::new(VOLUME, Compression::None, None);
        let mut stored = codec.encode(1, &[]).unwrap();
        stored[5] = compression;
        stored[8..16].copy_from_slice(&len.to_le_bytes());
        stored.extend_from_slice(&payload);
        if let Ok(block) = codec.decode(1, &stored, 1000) {
            prop_assert_eq!(block.len() as u64, len);
        }
    }
}

/// Every configuration round-trips text and random blocks, and says how fast. Quick by
/// default (one 64 KiB block, one round, so that it runs with every test run); with
/// `BLOCKCACHE_MEASURE_FORMAT=1` it measures 1 MiB blocks, the best of 7 rounds of 16:
/// `BLOCKCACHE_MEASURE_FORMAT=1 cargo test --release -p blockcache-backend format::tests::measure -- --nocapture`.
#[test]
#[allow(clippy::print_stdout)]
fn measure() {
    let full = std::env::var_os("BLOCKCACHE_MEASURE_FORMAT").is_some();
    let (size, n, rounds) = if full {
        (1 << 20, 16, 7)
    } else {
        (64 << 10, 1, 1)
    };
    let datasets = [("text", text(size, 100)), ("random", random(size, 101))];
    let configs: [(&str, Compression, bool); 8] = [
        ("none", Compression::None, false),
        ("zstd-1", Compression::Zstd { level: 1 }, false),
        ("zstd-3", Compression::Zstd { level: 3 }, false),
        ("zstd-6", Compression::Zstd { level: 6 }, false),
        ("lz4", Compression::Lz4, false),
        ("xchacha", Compression::None, true),
        ("zstd-3+xchacha", Compression::Zstd { level: 3 }, true),
        ("lz4+xchacha", Compression::Lz4, true),
    ];
    for (data_name, block) in &datasets {
        for (name, compression, encrypted) in configs {
            let codec = ObjectCodec::new(VOLUME, compression, encrypted.then(key));
            let stored = codec.encode(1, block).unwrap();
            assert_eq!(&codec.decode(1, &stored, MAX).unwrap(), block, "{name}");
            // The best of several rounds: the machine is shared.
            let best = |f: &dyn Fn(usize)| {
                (0..rounds)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        (0..n).for_each(f);
                        start.elapsed()
                    })
                    .min()
                    .unwrap()
            };
            let enc = best(&|i| {
                std::hint::black_box(codec.encode(i as u64, block).unwrap());
            });
            let dec = best(&|_| {
                std::hint::black_box(codec.decode(1, &stored, MAX).unwrap());
            });
            let mib = (n * block.len()) as f64 / f64::from(1 << 20);
            println!(
                "{data_name:6} {name:15} encode {:7.0} MiB/s  decode {:7.0} MiB/s  both {:7.0} MiB/s  ratio {:.2}",
                mib / enc.as_secs_f64(),
                mib / dec.as_secs_f64(),
                mib / (enc + dec).as_secs_f64(),
                block.len() as f64 / stored.len() as f64,
            );
        }
    }
    if full {
        let kdf = Kdf::new_random();
        let start = std::time::Instant::now();
        kdf.derive(b"passphrase").unwrap();
        println!("argon2id {kdf}: {:?}", start.elapsed());
    }
}
