//! Helpers of crash tests: a child process that holds a volume open until it is killed with
//! SIGKILL, and a file system in an image whose state at an instant can be copied, which is
//! what a power loss at that instant leaves on the disk.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Env, WAIT, within};

/// What a `hold-cache` child does with the blocks it wrote before it waits to be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// `BlockCache::sync`: durable in the cache directory.
    Sync,
    /// `BlockCache::flush`: in the store (a `file://` store, by its URL).
    Flush,
}

/// A running `hold-cache` child (see its source): it opened a volume, wrote its blocks,
/// synced or flushed them, and waits to be killed. Killed when dropped.
pub struct Holder {
    child: Child,
}

impl Holder {
    /// Starts `exe` (the `hold-cache` binary: `env!("CARGO_BIN_EXE_hold-cache")` in a
    /// test) on `env`'s database and store with `cache_dir`, and waits (up to 30 s) until it
    /// says it synced `blocks` blocks.
    pub async fn start(exe: &str, env: &Env, cache_dir: &Path, blocks: u64) -> Self {
        Self::start_then(exe, env, cache_dir, blocks, Then::Sync).await
    }

    /// [`Holder::start`], then `then` instead of a sync.
    pub async fn start_then(
        exe: &str,
        env: &Env,
        cache_dir: &Path,
        blocks: u64,
        then: Then,
    ) -> Self {
        let (arg, said) = match then {
            Then::Sync => ("sync", "synced"),
            Then::Flush => ("flush", "flushed"),
        };
        let mut child = Command::new(exe)
            .arg(cache_dir)
            .arg(env.db_path())
            .arg(env.store_dir())
            .arg(blocks.to_string())
            .arg(arg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start hold-cache");
        let stdout = child.stdout.take().expect("piped");
        let line = within(
            "the child process to open the volume, write and sync or flush",
            WAIT,
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .expect("read the child's output");
        let expected = format!("{said} {blocks}");
        if line.as_deref() != Some(expected.as_str()) {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = within(
                    "the child's error output",
                    WAIT,
                    e.read_to_string(&mut stderr),
                )
                .await;
            }
            panic!("hold-cache said {line:?} instead of `{expected}`: {stderr}");
        }
        Self { child }
    }

    /// Kills the child with SIGKILL (no destructor, no shutdown) and reaps it.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL the child");
        let status = within("the killed child to exit", WAIT, self.child.wait())
            .await
            .expect("reap the child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}

/// An ext4 file system in an image file, mounted through a loop device. Dropping it unmounts
/// it lazily (the loop device is freed once nothing uses the file system), which writes what
/// the kernel still holds back to the image.
pub struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
}

impl LoopFs {
    /// Makes a 64 MiB ext4 image at `image` and mounts it on `mount`. `Err` says why this
    /// machine cannot (no `mkfs.ext4`, not root, no loop devices).
    pub fn create(image: &Path, mount: &Path) -> Result<Self, String> {
        let file = std::fs::File::create(image).map_err(|e| format!("create image: {e}"))?;
        file.set_len(64 << 20)
            .map_err(|e| format!("size image: {e}"))?;
        drop(file);
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        )?;
        Self::mount(image, mount)
    }

    /// Mounts the ext4 image `image` on `mount` through a loop device (which is freed at
    /// unmount). Options: no `auto_da_alloc`, so that ext4 does not start writing a file
    /// replaced by rename or truncation on its own (which would hide a missing fsync);
    /// journal commits every 600 s rather than 5 s, so that none runs during a test.
    pub fn mount(image: &Path, mount: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(mount).map_err(|e| format!("create mount point: {e}"))?;
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                "-o".as_ref(),
                "loop,noauto_da_alloc,commit=600".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        )?;
        Ok(Self {
            image: image.to_owned(),
            mount: mount.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Copies the image as the device holds it now, to `to`: data the kernel still holds in
    /// its page cache (written but never synced) is not in it, as after a power loss now.
    pub fn power_loss_copy(&self, to: &Path) {
        std::fs::copy(&self.image, to).expect("copy the image");
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &["-l".as_ref(), self.mount.as_os_str()]) {
            eprintln!("{e}");
        }
    }
}

/// Runs `program` with `args`; `Err` with its output if it cannot start or fails.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
