//! Harness for the daemon tests: the real `blockcache` binary on a free loopback port in a
//! temporary data directory, spoken to with a real HTTP client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The `blockcache` binary of this build, built first if it is missing.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The test binary lives in target/<profile>/deps; the daemon in target/<profile>.
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile> directory");
        let bin = profile_dir.join("blockcache");
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--workspace", "--all-features", "--bins"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the blockcache binary failed");
        }
        assert!(bin.exists(), "no blockcache binary at {}", bin.display());
        bin
    })
    .clone()
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Where its log (standard error) goes.
    pub log: PathBuf,
    /// An HTTP client.
    pub http: reqwest::Client,
}

/// Runs `blockcache` with `args` to completion: (status, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&[u8]>) -> (ExitStatus, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("BLOCKCACHE_AUTH_TOKEN")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blockcache");
    if let Some(input) = stdin {
        let mut s = child.stdin.take().expect("stdin");
        // The command may exit without reading it all (an error): not a test failure.
        let _ = s.write_all(input);
    }
    let out = child.wait_with_output().expect("wait blockcache");
    (
        out.status,
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Daemon {
    /// Starts `blockcache serve` on a free port with data in `data_dir` and `args` on top.
    /// Panics with the daemon's log if it does not come up.
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Self::try_start(data_dir, args).unwrap_or_else(|log| panic!("daemon did not start:\n{log}"))
    }

    /// Like [`Daemon::start`], returning the log if the daemon exits before listening.
    pub fn try_start(data_dir: &Path, args: &[&str]) -> Result<Self, String> {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log = data_dir.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env_remove("BLOCKCACHE_AUTH_TOKEN")
            .env("BLOCKCACHE_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let mut child = cmd.spawn().expect("spawn blockcache serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut first);
            let _ = tx.send(first);
            // Keep draining so the daemon never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(base) = line.trim().strip_prefix("blockcache listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        };
        Ok(Self {
            base: base.to_owned(),
            child: Some(child),
            log,
            http: reqwest::Client::new(),
        })
    }

    /// `ADDR:PORT` of the daemon.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // The kill command: signals other than SIGKILL need no unsafe code this way.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the daemon to exit (on a thread blocked in `wait`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(timeout) {
            Ok(status) => status.expect("wait for the daemon"),
            Err(_) => {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!(
                    "daemon still running after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(15);
        let status = self.wait(Duration::from_secs(60));
        assert!(
            status.success(),
            "daemon exited with {status}; log:\n{}",
            self.log_text()
        );
        self.log_text()
    }

    /// SIGKILL, then waits.
    pub fn kill9(mut self) {
        self.signal(9);
        self.wait(Duration::from_secs(30));
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PUT `body` to file `name`.
    pub async fn put(&self, name: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v1/files/{name}")))
            .body(body)
            .send()
            .await
            .expect("PUT")
    }

    /// GET file `name`: (status, body).
    pub async fn get(&self, name: &str) -> (u16, Vec<u8>) {
        let r = self
            .http
            .get(self.url(&format!("/v1/files/{name}")))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.bytes().await.expect("body").to_vec())
    }

    /// GET a JSON document.
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("json")
    }

    /// POST to `path`, expecting success.
    pub async fn post(&self, path: &str) -> serde_json::Value {
        let r = self.http.post(self.url(path)).send().await.expect("POST");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
        r.json().await.expect("json")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
