//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: everything CI checks, in order: tidy, `cargo fmt --check`, clippy with
//!   `-D warnings` on all targets, the test suite (nextest when installed, else `cargo test`),
//!   the doc tests, and `cargo doc` of the libraries with `-D warnings`.
//! - `tidy`: repository hygiene: every Rust file starts with a `//!` module comment. The
//!   test `tests::the_repository_is_tidy` runs the same check, so the test suite covers it.
//! - `bench [flags]`: builds `blockcache-bench` and the daemon in release mode and runs the
//!   benchmark; flags pass through (`--data-mib`, `--runs`, `--block-sizes`, `--dup`,
//!   `--meta-blocks`, `--daemon-block-size`, `--rss-factor`, `--format-mib`, `--format-configs`,
//!   `--only patch|format|metadata|daemon`, `--dir`, `--out`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("tidy") => tidy(),
        Some("bench") => bench(&args[1..]),
        _ => Err("usage: cargo xtask <ci|tidy|bench [flags]>".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// Builds the benchmark and the daemon in release mode, then runs the benchmark binary
/// directly (flags pass through).
fn bench(flags: &[String]) -> Result<(), String> {
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "blockcache-bench",
            "--package",
            "blockcache-daemon",
        ],
    )?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let exe = target.join("release").join("blockcache-bench");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    run(exe.to_str().ok_or("target path is not UTF-8")?, &flags)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    println!("$ {program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    // `cargo xtask` runs under cargo, which sets variables describing the xtask package
    // (CARGO_PKG_*, CARGO_MANIFEST_*, ...). A nested cargo must not see them: they make build
    // scripts rerun and parts of the tree rebuild on every call.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_MAKEFLAGS"
                    | "MAKEFLAGS"
                    | "MFLAGS"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    let status = cmd
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed with {status}",
            args.join(" ")
        ))
    }
}

fn has_nextest() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ci() -> Result<(), String> {
    tidy()?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The daemon tests start the real `blockcache` binary.
    run(
        "cargo",
        &["build", "--workspace", "--all-features", "--bins"],
    )?;
    if has_nextest() {
        run(
            "cargo",
            &[
                "nextest",
                "run",
                "--workspace",
                "--all-features",
                "--profile",
                "ci",
            ],
        )?;
    } else {
        run("cargo", &["test", "--workspace", "--all-features"])?;
    }
    run("cargo", &["test", "--workspace", "--doc"])?;
    // The libraries' documentation builds without a warning (broken or private links).
    // `--lib`: the daemon's binary is also named `blockcache`, and its docs would overwrite
    // the library's.
    run(
        "cargo",
        &[
            "doc",
            "--workspace",
            "--no-deps",
            "--lib",
            "--config",
            "build.rustdocflags=[\"-D\", \"warnings\"]",
        ],
    )?;
    println!("ci: all checks passed");
    Ok(())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn tidy() -> Result<(), String> {
    let checked = check_tidy(&root())?;
    println!("tidy: {checked} Rust files start with a //! comment");
    Ok(())
}

/// Checks the Rust files under `root`'s `crates`, `tests` and `xtask`; returns how many
/// there are, or names those that fail.
fn check_tidy(root: &Path) -> Result<usize, String> {
    let mut files = Vec::new();
    for dir in ["crates", "tests", "xtask"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut bad = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("read {}: {e}", file.display()))?;
        if !text.starts_with("//!") {
            bad.push(
                file.strip_prefix(root)
                    .unwrap_or(file)
                    .display()
                    .to_string(),
            );
        }
    }
    if bad.is_empty() {
        Ok(files.len())
    } else {
        Err(format!(
            "files without a leading //! module comment: {}",
            bad.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{check_tidy, root};

    #[test]
    fn the_repository_is_tidy() {
        let checked = check_tidy(&root()).unwrap_or_else(|e| panic!("tidy: {e}"));
        assert!(
            checked > 0,
            "tidy found no Rust files under {}",
            root().display()
        );
    }

    #[test]
    fn tidy_names_a_file_without_a_module_comment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("crates").join("x").join("src");
        std::fs::create_dir_all(&src).expect("create dirs");
        std::fs::write(src.join("lib.rs"), "//! Documented.\n").expect("write");
        assert_eq!(check_tidy(dir.path()), Ok(1));
        std::fs::write(src.join("bare.rs"), "fn f() {}\n").expect("write");
        let err = check_tidy(dir.path()).expect_err("a file without //!");
        assert!(err.contains("crates/x/src/bare.rs"), "{err}");
        assert!(!err.contains("lib.rs"), "{err}");
    }
}
