//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: everything CI checks, in order: tidy, `cargo fmt --check`, clippy with
//!   `-D warnings` on all targets, the test suite (nextest when installed, else `cargo test`),
//!   and the doc tests.
//! - `tidy`: repository hygiene: every Rust file starts with a `//!` module comment.
//! - `bench [flags]`: builds and runs `blockcache-bench` in release mode; flags pass through
//!   (`--data-mib`, `--runs`, `--block-sizes`, `--dup`, `--meta-blocks`, `--dir`, `--out`).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("tidy") => tidy(),
        Some("bench") => {
            let mut cmd = vec!["run", "--release", "--package", "blockcache-bench", "--"];
            cmd.extend(args[1..].iter().map(String::as_str));
            run("cargo", &cmd)
        }
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

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
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
    let root = root();
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
                file.strip_prefix(&root)
                    .unwrap_or(file)
                    .display()
                    .to_string(),
            );
        }
    }
    if bad.is_empty() {
        println!("tidy: {} Rust files start with a //! comment", files.len());
        Ok(())
    } else {
        Err(format!(
            "files without a leading //! module comment: {}",
            bad.join(", ")
        ))
    }
}
