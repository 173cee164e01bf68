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
    /// `http://127.0.0.1:PORT` of its S3 endpoint, unless it is off.
    pub s3: Option<String>,
    /// Where its log (standard error) goes.
    pub log: PathBuf,
    /// An HTTP client.
    pub http: reqwest::Client,
}

/// How long a command-line client may run before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one HTTP request of a test may take, its body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Daemon::wait_for_log`] and [`Daemon::wait_for_entries`] wait.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `blockcache` with `args` to completion: (status, stdout, stderr). Panics if it runs
/// longer than a minute.
pub fn run_cli(args: &[&str], stdin: Option<&[u8]>) -> (ExitStatus, Vec<u8>, String) {
    run_cli_env(args, &[], stdin)
}

/// [`run_cli`] with environment variables `env` set (every other `BLOCKCACHE_*` variable of
/// the test's environment is removed).
pub fn run_cli_env(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> (ExitStatus, Vec<u8>, String) {
    use std::io::Write;
    let mut cmd = Command::new(binary());
    cmd.args(args);
    clean_env(&mut cmd);
    cmd.envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn blockcache");
    let pid = child.id();
    let input = stdin.map(<[u8]>::to_vec);
    let mut pipe = child.stdin.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let (Some(input), Some(s)) = (input, pipe.as_mut()) {
            // The command may exit without reading it all (an error): not a test failure.
            let _ = s.write_all(&input);
        }
        drop(pipe);
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(CLI_TIMEOUT) {
        Ok(out) => out.expect("wait blockcache"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("blockcache {args:?} still running after {CLI_TIMEOUT:?}");
        }
    };
    (
        out.status,
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes every `BLOCKCACHE_*` variable of the test's own environment from `cmd`, so that
/// only what a test sets reaches the binary.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BLOCKCACHE_") {
            cmd.env_remove(key);
        }
    }
}

/// How to start a daemon: [`Daemon::start`] with more control.
#[derive(Debug, Clone)]
pub struct Launch {
    data_dir: PathBuf,
    listen: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    /// Prefixes of the test's variables that the daemon does not inherit.
    unset: Vec<String>,
}

impl Launch {
    /// `blockcache serve --listen 127.0.0.1:0 --data-dir DATA_DIR`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".to_owned(),
            args: Vec::new(),
            // No S3 endpoint unless a test asks for one (`--s3-listen 127.0.0.1:0`): its
            // default port is one for all, and tests run side by side.
            env: vec![
                ("BLOCKCACHE_LOG_LEVEL".to_owned(), "info".to_owned()),
                ("BLOCKCACHE_S3_LISTEN".to_owned(), "off".to_owned()),
            ],
            wrapper: Vec::new(),
            unset: Vec::new(),
        }
    }

    /// Runs the daemon through `command` (a program and its arguments, such as
    /// `prlimit --nofile=256:256`), which must exec the binary in its own process.
    pub fn wrapped_in(mut self, command: &[&str]) -> Self {
        self.wrapper = command.iter().map(|&a| a.to_owned()).collect();
        self
    }

    /// Listens on `addr` instead of a free loopback port (the harness still talks to the
    /// daemon on loopback).
    pub fn listen(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.listen);
        self
    }

    /// Adds command-line arguments after `--listen` and `--data-dir`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|&a| a.to_owned()));
        self
    }

    /// Sets an environment variable of the daemon.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Keeps every variable of the test's environment whose name starts with `prefix` from
    /// the daemon (variables set with [`Launch::env`] still reach it).
    pub fn unset_env(mut self, prefix: &str) -> Self {
        self.unset.push(prefix.to_owned());
        self
    }

    /// Starts the daemon; panics with its log if it does not come up.
    pub fn start(self) -> Daemon {
        self.try_start()
            .unwrap_or_else(|log| panic!("daemon did not start:\n{log}"))
    }

    /// Starts the daemon, returning its log if it exits before listening.
    pub fn try_start(self) -> Result<Daemon, String> {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = self.data_dir.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(binary()),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary());
                cmd
            }
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args);
        clean_env(&mut cmd);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if self.unset.iter().any(|p| name.starts_with(p.as_str())) {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let mut child = cmd.spawn().expect("spawn blockcache serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            // The address of the file API, then that of the S3 endpoint (if it is on).
            for _ in 0..2 {
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                if tx.send(line).is_err() {
                    break;
                }
            }
            // Keep draining so the daemon never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        let Some(base) = line.trim().strip_prefix("blockcache listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(if line.is_empty() && text.is_empty() {
                format!("no address printed within {START_TIMEOUT:?} and no log")
            } else {
                text
            });
        };
        // A daemon listening on every address is reached on loopback.
        let loopback = |base: &str| {
            base.replace("http://0.0.0.0:", "http://127.0.0.1:")
                .replace("http://[::]:", "http://[::1]:")
        };
        let base = loopback(base);
        // The flag wins over the variable; the last variable set wins.
        let flag = self
            .args
            .windows(2)
            .rev()
            .find(|w| w[0] == "--s3-listen")
            .map(|w| w[1].clone());
        let variable = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "BLOCKCACHE_S3_LISTEN")
            .map(|(_, v)| v.clone());
        let s3_on = flag.or(variable).is_some_and(|v| v != "off");
        let s3 = if !s3_on {
            None
        } else {
            let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
            line.trim()
                .strip_prefix("blockcache S3 endpoint on ")
                .map(loopback)
        };
        Ok(Daemon {
            base,
            s3,
            child: Some(child),
            log,
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("HTTP client"),
        })
    }
}

impl Daemon {
    /// Starts `blockcache serve` on a free port with data in `data_dir` and `args` on top.
    /// Panics with the daemon's log if it does not come up.
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Launch::new(data_dir).args(args).start()
    }

    /// Like [`Daemon::start`], returning the log if the daemon exits before listening.
    pub fn try_start(data_dir: &Path, args: &[&str]) -> Result<Self, String> {
        Launch::new(data_dir).args(args).try_start()
    }

    /// `ADDR:PORT` of the daemon.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics' text")
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

    /// Waits until the daemon's log contains `text`; panics with the log after a minute.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        while !self.log_text().contains(text) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {text:?} in the log after {WAIT_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The number of entries in the daemon's cache.
    pub async fn cache_entries(&self) -> u64 {
        self.json("/v1/stats").await["cache"]["entries"]
            .as_u64()
            .expect("entries")
    }

    /// Waits until the daemon's cache holds more than `n` entries (a body it is reading has
    /// reached the cache); panics after a minute.
    pub async fn wait_for_entries(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        loop {
            let entries = self.cache_entries().await;
            if entries > n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cache still holds {entries} entries (waiting for more than {n}) after {WAIT_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            panic!("POST {path}: {status} {body}\n{}", self.log_text());
        }
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
