//! The format workload: the library workload (write+flush, cold read) with the object format's
//! compression and encryption, on content that compresses (text-like) and content that does
//! not (random), each figure as a ratio to the plain volume (no compression, no encryption)
//! measured in the same run on the same content.
//!
//! A plain volume on a `file://` store on the cache's file system stores its objects as hard
//! links to the cache files and reads them back the same way: nothing is copied. That is the
//! real plain path of a local store, so the ratios are to it; `plain-copy` is the same plain
//! volume with links refused ([`blockcache_backend::Backend::without_links`], as for a store on
//! another file system), so that the bytes are copied into the store and out of it, the way
//! every framed object is: the figures are also given as ratios to it.
//!
//! Configurations (`--format-configs`, comma-separated): `plain`, `plain-copy`, `zstd`
//! (the default level, 1), `zstdN` (level N), `lz4`, and any compression with `+enc`
//! (XChaCha20-Poly1305 with a random key; `none+enc` encrypts without compressing). Each runs
//! on `--format-mib` MiB of each content, with no duplicate blocks (so that the store's bytes
//! are the format's doing, not deduplication's), at `--block-size`.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use blockcache::Secret;
use blockcache_backend::format::{Compression, Key};

use crate::{Args, Error, Sample, Stat, xorshift};

/// The configurations of a run unless `--format-configs` names others.
pub const DEFAULT_CONFIGS: [&str; 7] = [
    "plain",
    "plain-copy",
    "zstd",
    "lz4",
    "none+enc",
    "zstd+enc",
    "zstd3+enc",
];

/// The kinds of content.
pub const CONTENTS: [&str; 2] = ["text", "random"];

/// How the volume of a library run is set up.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `None`: the engine's default ([`blockcache::Config::new`]).
    pub compression: Option<Compression>,
    /// Encrypt with a random key.
    pub encrypt: bool,
    /// Refuse hard links between the cache and a `file://` store (objects are copied).
    pub no_links: bool,
    /// Text-like content instead of random bytes.
    pub text: bool,
}

impl Setup {
    /// The setup of configuration `spec` (see the module comment) on `content`.
    pub fn parse(spec: &str, content: &str) -> Result<Self, Error> {
        let text = match content {
            "text" => true,
            "random" => false,
            other => return Err(format!("content {other:?}: expected text or random").into()),
        };
        let (base, encrypt) = match spec.strip_suffix("+enc") {
            Some(base) => (base, true),
            None => (spec, false),
        };
        let bad = |why: &str| -> Error { format!("format configuration {spec:?}: {why}").into() };
        let (compression, no_links) = match base {
            "plain" | "plain-copy" if encrypt => {
                return Err(bad("a plain volume is not encrypted (use none+enc)"));
            }
            "plain" => (Compression::None, false),
            "plain-copy" => (Compression::None, true),
            "none" if !encrypt => return Err(bad("none without +enc is plain")),
            "none" => (Compression::None, false),
            "lz4" => (Compression::Lz4, false),
            "zstd" => (Compression::default(), false),
            zstd if zstd.starts_with("zstd") => {
                let level = zstd["zstd".len()..]
                    .parse()
                    .map_err(|_| bad("expected zstd or zstd<level>"))?;
                (Compression::zstd(level)?, false)
            }
            _ => {
                return Err(bad(
                    "expected plain, plain-copy, zstd, zstd<level>, lz4 or none, optionally with +enc",
                ));
            }
        };
        Ok(Self {
            compression: Some(compression),
            encrypt,
            no_links,
            text,
        })
    }

    /// The secret of the volume: a fresh random key when encrypted.
    pub fn secret(&self) -> Option<Secret> {
        self.encrypt.then(|| Secret::Key(Arc::new(Key::generate())))
    }
}

/// The group of configuration `spec` on `content` in the results.
pub fn group(spec: &str, content: &str) -> String {
    format!("format/{content}/{spec}")
}

/// Number of words in the vocabulary of the text-like content. With words of 2 to 9 letters
/// drawn uniformly from it, zstd (level 3, 1 MiB blocks) stores it at 2.93:1 (4,096 words
/// gave 2.68:1, 2,048 gave 2.80:1).
const WORDS: usize = 1 << 10;

/// The vocabulary: every word with a space after it, and where each starts.
struct Vocabulary {
    bytes: Vec<u8>,
    /// (start, length with the space) of each word.
    words: Vec<(u32, u32)>,
}

fn vocabulary() -> &'static Vocabulary {
    static VOCABULARY: OnceLock<Vocabulary> = OnceLock::new();
    VOCABULARY.get_or_init(|| {
        // Letters weighted roughly as in English text.
        const LETTERS: &[u8] = b"eeeeeeeeeeeetttttttttaaaaaaaaoooooooiiiiiiinnnnnnnsssssshhhhhhrrrrrrddddlllluuucccmmmwwffggyyppbbvkjxqz";
        let mut x = 0x005e_ed0f_7e47_u64;
        let mut bytes = Vec::new();
        let mut words = Vec::with_capacity(WORDS);
        for _ in 0..WORDS {
            let r = xorshift(&mut x);
            let len = 2 + (r % 8) as usize;
            let start = bytes.len();
            for i in 0..len {
                let r = xorshift(&mut x) >> (i % 4);
                bytes.push(LETTERS[(r % LETTERS.len() as u64) as usize]);
            }
            bytes.push(b' ');
            words.push((start as u32, (len + 1) as u32));
        }
        Vocabulary { bytes, words }
    })
}

/// Fills `buf` with text-like bytes derived from `seed`: words of a fixed vocabulary of
/// [`WORDS`] drawn at random, each followed by a space.
pub fn fill_text(buf: &mut [u8], seed: u64) {
    let v = vocabulary();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pos = 0;
    'fill: loop {
        let r = xorshift(&mut x);
        // Five words from each 64-bit draw (12 bits each, of which the vocabulary uses 10).
        for k in 0..5 {
            let (start, len) = v.words[((r >> (12 * k)) as usize) & (WORDS - 1)];
            let word = &v.bytes[start as usize..(start + len) as usize];
            let n = word.len().min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&word[..n]);
            pos += n;
            if pos == buf.len() {
                break 'fill;
            }
        }
    }
}

/// The figures compared with the plain volumes, and the names of their ratios.
const RATIOS: [(&str, &str); 2] = [
    ("write_flush_mib_s", "write_flush"),
    ("cold_read_mib_s", "cold_read"),
];

/// Adds to each sample of the format workload its ratios to `plain` and to `plain-copy` of the
/// same run and content (`write_flush_vs_plain`, ..., `cold_read_vs_copy`): taken run by
/// run, they are steadier than ratios of medians on a shared machine.
pub fn add_ratios(results: &mut BTreeMap<String, Vec<Sample>>) {
    for content in CONTENTS {
        let bases: Vec<(&str, Vec<Sample>)> = [("plain", "plain"), ("copy", "plain-copy")]
            .into_iter()
            .filter_map(|(name, spec)| Some((name, results.get(&group(spec, content))?.clone())))
            .collect();
        let prefix = format!("format/{content}/");
        for (g, samples) in results.iter_mut() {
            if !g.starts_with(&prefix) {
                continue;
            }
            for (run, sample) in samples.iter_mut().enumerate() {
                for (base_name, base) in &bases {
                    let Some(base) = base.get(run) else { continue };
                    for (key, name) in RATIOS {
                        if let (Some(v), Some(b)) = (sample.values.get(key), base.values.get(key))
                            && *b > 0.0
                        {
                            let ratio = v / b;
                            sample
                                .values
                                .insert(format!("{name}_vs_{base_name}"), ratio);
                        }
                    }
                }
            }
        }
    }
}

/// The configurations of this run.
pub fn configs(args: &Args) -> Vec<String> {
    args.format_configs.clone()
}

/// Prints the format workload's table: per content and configuration, write+flush and cold
/// read as ratios to `plain` (and to `plain-copy`), CPU seconds, and the store's bytes per
/// logical byte.
pub fn print(args: &Args, stats: &BTreeMap<String, BTreeMap<String, Stat>>) {
    let get = |group: &str, key: &str| stats.get(group).and_then(|g| g.get(key));
    let med = |group: &str, key: &str| get(group, key).map(|s| s.median);
    let range = |s: Option<&Stat>, places: usize| {
        s.map_or("-".to_owned(), |s| {
            format!(
                "{:.places$} ({:.places$}-{:.places$})",
                s.median, s.min, s.max
            )
        })
    };
    println!(
        "\nformat workload: {} MiB per configuration and content at {} KiB blocks, no duplicates, file:// store on the cache's disk, median of {} runs (min-max); ratios per run to plain (hard links) and to plain-copy (copied)",
        args.format_mib,
        args.block_size >> 10,
        args.runs
    );
    println!(
        "{:<7} {:<12} {:>20} {:>18} {:>18} {:>18} {:>18} {:>16} {:>16} {:>9}",
        "content",
        "config",
        "write+flush MiB/s",
        "w+f vs plain",
        "w+f vs copy",
        "cold vs plain",
        "cold vs copy",
        "w+f CPU s",
        "cold CPU s",
        "store/log"
    );
    for content in CONTENTS {
        for spec in configs(args) {
            let g = group(&spec, content);
            if !stats.contains_key(&g) {
                continue;
            }
            let stored = med(&g, "store_bytes").unwrap_or(0.0);
            let logical = med(&g, "logical_bytes").unwrap_or(0.0);
            println!(
                "{:<7} {:<12} {:>20} {:>18} {:>18} {:>18} {:>18} {:>16} {:>16} {:>9}",
                content,
                spec,
                range(get(&g, "write_flush_mib_s"), 0),
                range(get(&g, "write_flush_vs_plain"), 2),
                range(get(&g, "write_flush_vs_copy"), 2),
                range(get(&g, "cold_read_vs_plain"), 2),
                range(get(&g, "cold_read_vs_copy"), 2),
                range(get(&g, "write_flush_cpu_s"), 2),
                range(get(&g, "cold_read_cpu_s"), 2),
                if logical > 0.0 {
                    format!("{:.3}", stored / logical)
                } else {
                    "-".to_owned()
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use blockcache_backend::format::{Compression, ObjectCodec};

    use super::{Setup, fill_text};

    #[test]
    fn text_compresses_about_three_to_one_with_zstd() {
        let mut block = vec![0u8; 1 << 20];
        fill_text(&mut block, 42);
        let codec = ObjectCodec::new([7; 16], Compression::default(), None);
        let encoded = codec.encode(1, &block).expect("encode");
        let ratio = block.len() as f64 / encoded.len() as f64;
        assert!((2.5..3.6).contains(&ratio), "zstd ratio {ratio:.2}");
        println!("text-like content: zstd (default level) ratio {ratio:.2}");
        let mut other = vec![0u8; 1 << 20];
        fill_text(&mut other, 43);
        assert_ne!(block, other, "another seed gives other text");
    }

    #[test]
    fn random_blocks_do_not_compress() {
        let mut block = vec![0u8; 1 << 20];
        crate::fill(&mut block, 42);
        for compression in [Compression::default(), Compression::Lz4] {
            let codec = ObjectCodec::new([7; 16], compression, None);
            let encoded = codec.encode(1, &block).expect("encode");
            assert!(
                encoded.len() > block.len(),
                "{compression}: {} bytes from {}",
                encoded.len(),
                block.len()
            );
        }
    }

    #[test]
    fn configurations_parse_and_bad_ones_are_named() {
        let s = Setup::parse("zstd+enc", "text").expect("zstd+enc");
        assert!(s.encrypt && s.text && !s.no_links);
        assert_eq!(s.compression, Some(Compression::default()));
        let s = Setup::parse("zstd3", "random").expect("zstd3");
        assert_eq!(s.compression, Some(Compression::Zstd { level: 3 }));
        assert!(Setup::parse("plain-copy", "text").expect("copy").no_links);
        for bad in ["plain+enc", "none", "zstdx", "gzip"] {
            let e = Setup::parse(bad, "text").expect_err(bad).to_string();
            assert!(e.contains(bad), "{e}");
        }
        assert!(Setup::parse("zstd", "binary").is_err());
    }
}
