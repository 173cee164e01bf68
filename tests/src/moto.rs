//! A real S3 server for the daemon tests: moto's server (`python3 -m moto.server`, installed
//! by `.ci/run`) on a free loopback port, killed with SIGKILL to make an outage and started
//! again on the same port. Buckets are made and listed with plain HTTP calls (moto takes
//! them unsigned).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long moto may take to accept connections (it imports a lot on a loaded machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running moto server.
pub struct Moto {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: std::path::PathBuf,
}

/// Whether moto's server can run here; if not, the reason (tests then skip and say so).
pub fn unavailable() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| {
        "moto's server is not installed (python3 -m pip install 'moto[server]')".to_owned()
    })
}

/// Whether moto is here; prints why test `test` skips if not.
pub fn available_or_skip(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(reason) => {
            eprintln!("{test}: skipped: {reason}");
            false
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Moto {
    /// Starts moto on a free port and waits until it accepts connections. `log_dir` keeps
    /// its output.
    pub fn start(log_dir: &std::path::Path) -> Self {
        Self::start_on(free_port(), log_dir)
    }

    /// Starts moto on `port` (a restart after [`Moto::kill`]); panics with its output if it
    /// does not accept connections within a minute.
    pub fn start_on(port: u16, log_dir: &std::path::Path) -> Self {
        let log = log_dir.join(format!("moto-{port}-{}.log", std::process::id()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("moto log");
        let err = out.try_clone().expect("moto log");
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn moto's server");
        let mut moto = Self {
            child: Some(child),
            port,
            log,
        };
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = moto
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("moto exited with {status}:\n{}", moto.log_text());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "moto not listening on port {port} after {START_TIMEOUT:?}:\n{}",
                moto.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        moto
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables that point the daemon's S3 client at this server, with test
    /// credentials.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
    }

    /// A daemon with data in `data_dir` on the store `s3://BUCKET/PREFIX` of this server
    /// (`store`), with test credentials and no other `AWS_*` variable of the test's.
    pub fn launch(&self, data_dir: &std::path::Path, store: &str) -> crate::daemon::Launch {
        let mut launch = crate::daemon::Launch::new(data_dir)
            .unset_env("AWS_")
            .args(&["--store", store]);
        for (k, v) in self.env() {
            launch = launch.env(k, &v);
        }
        launch
    }

    /// A client of bucket `bucket` on this server, for the library's tests.
    pub fn store(&self, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_allow_http(true)
            .build()
            .expect("an S3 client");
        std::sync::Arc::new(s3)
    }

    /// The bytes of object `key` in bucket `bucket` (a signed GET: moto keeps objects
    /// private).
    pub async fn object(&self, bucket: &str, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        self.store(bucket)
            .get(&object_store::path::Path::from(key))
            .await
            .expect("get object")
            .bytes()
            .await
            .expect("object")
            .to_vec()
    }

    /// Creates bucket `name`.
    pub async fn create_bucket(&self, name: &str) {
        let r = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint()))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("create bucket");
        assert!(
            r.status().is_success(),
            "create bucket {name}: {}",
            r.status()
        );
    }

    /// The keys under `prefix` in bucket `name` (one page of up to 1,000, enough here).
    pub async fn keys(&self, name: &str, prefix: &str) -> Vec<String> {
        let r = reqwest::Client::new()
            .get(format!(
                "{}/{name}?list-type=2&prefix={prefix}",
                self.endpoint()
            ))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("list bucket");
        assert!(
            r.status().is_success(),
            "list bucket {name}: {}",
            r.status()
        );
        let xml = r.text().await.expect("listing");
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// From now on the server checks every request's signature against its own IAM users,
    /// of which there are none: every S3 request is refused with 403 (`InvalidAccessKeyId`),
    /// as a store refuses credentials it does not know. The helpers of this type, which send
    /// unsigned requests, stop working too.
    pub async fn deny_every_request(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/reset-auth", self.endpoint()))
            .body("0")
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("enable moto's authentication");
        assert!(
            r.status().is_success(),
            "enable moto's authentication: {}",
            r.status()
        );
    }

    /// SIGSTOP: the server keeps its objects, and connections are accepted (by the kernel)
    /// but never answered, as with a store that hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Moto::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("moto is running").id();
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// SIGKILL: the store is gone at once, as in a crash or a network cut.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server dies too, but continue it anyway so its port closes at once.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}
