//! Fixtures shared by every integration test: a real tansu broker on a free loopback
//! port, a development PKI in a temp dir, a spawned `fleetgate-ingest` process, a
//! Prometheus scrape, and a plain rdkafka reader. No mocks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetgate_pki::{DevCa, DeviceCertSpec, Issued};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

pub const TRUST_DOMAIN: &str = "fleetgate.test";
pub const TOPICS: [&str; 6] = [
    "telemetry.events.v1",
    "telemetry.rejected.v1",
    "fleet.device-state.v1",
    "telemetry.quarantined.v1",
    "telemetry.anomalies.v1",
    "fleet.quarantine.v1",
];

/// The tansu binary: `$TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cargo/bin/tansu")
}

/// Another binary of this workspace, from the target dir the running test was built
/// into (`cargo test --workspace` builds every binary first). Fails with the command to
/// run when it is missing, rather than testing a stale or absent build silently.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?;
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A tansu broker process with in-memory storage; killed on drop.
pub struct Broker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker on a free loopback port with the fleetgate topics created.
    /// Retried on a new port when the first attempt fails: between picking a free port
    /// and binding it, another test process may have taken it.
    pub fn start() -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::try_start() {
                Ok(broker) => return Ok(broker),
                Err(e) if attempt < 3 => {
                    eprintln!("tansu start attempt {attempt} failed, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (install: make deps)", tansu_bin().display()))?;
        let mut broker = Self { child, port, dir };
        wait_for_port(port, Duration::from_secs(20))?;
        if let Some(status) = broker.child.try_wait()? {
            bail!(
                "tansu exited ({status}) right after start (port {port} taken?): {}",
                broker.logs()
            );
        }
        for topic in TOPICS {
            broker.create_topic(topic, 3)?;
        }
        Ok(broker)
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    /// From a producer's view, a hung or unreachable broker; its state is kept.
    /// (tansu 0.6's sqlite engine panics when restarted under an idempotent
    /// producer, so an outage is a freeze, not a restart.)
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes one record and waits until the broker has it (blocking, up to 10 s).
    pub fn produce(&self, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .context("creating a producer")?;
        producer
            .send(BaseRecord::to(topic).key(key).payload(payload))
            .map_err(|(e, _)| e)
            .with_context(|| format!("producing to {topic}"))?;
        producer
            .flush(Duration::from_secs(10))
            .with_context(|| format!("flushing to {topic}"))
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        let out = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string(), name])
            .output()
            .context("running tansu topic create")?;
        if !out.status.success() {
            bail!(
                "tansu topic create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The broker's log so far (for failure messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}")
}

/// A development CA and server certificate in a temp dir.
pub struct TestPki {
    pub ca: DevCa,
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("fleetgate test fleet CA")?;
        ca.write(dir.path())?;
        ca.issue_server(&["localhost", "127.0.0.1"])?
            .write(dir.path(), "server")?;
        Ok(Self { ca, dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn device(&self, fleet: &str, device: &str) -> Issued {
        self.ca
            .issue_device(&DeviceCertSpec::new(TRUST_DOMAIN, fleet, device))
            .expect("issuing a device certificate")
    }

    pub fn issue(&self, spec: &DeviceCertSpec) -> Issued {
        self.ca.issue_device(spec).expect("issuing a certificate")
    }

    /// Writes a CRL revoking `serials` and returns its path.
    pub fn write_crl(&self, serials: &[&str]) -> PathBuf {
        let path = self.dir.path().join("crl.pem");
        std::fs::write(&path, self.ca.crl_pem(serials).expect("signing CRL")).expect("writing CRL");
        path
    }

    /// The `[tls]` section pointing at this PKI.
    pub fn tls_toml(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "[tls]\nserver_cert = \"{d}/server.pem\"\nserver_key = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n"
        )
    }
}

/// A running `fleetgate-ingest` process; SIGKILLed on drop unless shut down.
pub struct Ingest {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub quic: SocketAddr,
    /// The config file the process was started with (rewrite it, then [`Ingest::signal`]
    /// `HUP`, to test a reload).
    pub config: PathBuf,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ingest {
    /// Spawns `bin` with a config made of `toml` (which should include the PKI's
    /// `[tls]` section and `[kafka]` bootstrap) and waits for its ready line.
    pub fn spawn(bin: &Path, toml: &str) -> anyhow::Result<Self> {
        Self::spawn_with_env(bin, toml, &[])
    }

    /// Like [`Ingest::spawn`], with `FLEETGATE_*` overrides in the environment.
    pub fn spawn_with_env(bin: &Path, toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("ingest.toml");
        std::fs::write(&config, toml)?;
        let stderr_path = dir.path().join("ingest.log");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("FLEETGATE_LOG", "info,rdkafka=warn")
            .env("FLEETGATE_LOG_FORMAT", "text")
            .env("FLEETGATE_GRPC__LISTEN", "127.0.0.1:0")
            .env("FLEETGATE_QUIC__LISTEN", "127.0.0.1:0")
            .env("FLEETGATE_METRICS__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let lines = StdoutLines::take(&mut child)?;
        let Some(line) = lines.wait_for("fleetgate-ingest ready", Duration::from_secs(30)) else {
            let _ = child.kill();
            bail!(
                "ingest did not become ready: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        Ok(Self {
            grpc: ready_field(&line, "grpc=")?,
            metrics: ready_field(&line, "metrics=")?,
            quic: ready_field(&line, "quic=")?,
            config,
            child,
            stderr_path,
            _dir: dir,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.grpc.port())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed");
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ingest did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fetches `/metrics` as text.
    pub fn scrape(&self) -> anyhow::Result<String> {
        http_get(self.metrics, "/metrics")
    }

    /// Value of one series, e.g. `fleetgate_events_rejected_total{reason="decode_error",transport="grpc"}`;
    /// labels may be given in any order.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let text = self.scrape()?;
        Ok(metric_value(&text, name, labels).unwrap_or(0.0))
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums a Prometheus series matching `name` and all `labels`.
/// A child's stdout read line by line on a thread of its own, so a test can wait for a
/// ready line (and later ones) with a timeout instead of blocking on the pipe.
pub struct StdoutLines(std::sync::mpsc::Receiver<String>);

impl StdoutLines {
    /// Takes over `child`'s piped stdout.
    pub fn take(child: &mut Child) -> anyhow::Result<Self> {
        let stdout = child.stdout.take().context("stdout is not piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self(rx))
    }

    /// The next line starting with `prefix` (earlier lines are skipped), if one comes
    /// within `timeout`; a zero timeout only looks at lines already read.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.0.recv_timeout(left).ok()?;
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }
}

/// The socket address after `name` (e.g. `grpc=`) in a binary's ready line.
pub fn ready_field(line: &str, name: &str) -> anyhow::Result<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .with_context(|| format!("no {name} in {line:?}"))?
        .parse()
        .with_context(|| format!("{name} in {line:?} is not an address"))
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_part) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            if let Ok(v) = value.trim().parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// Minimal HTTP/1.1 GET over loopback.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Reads every record of `topic` from the beginning until `want` records arrived or
/// `timeout` passed. Assigns partitions directly: no consumer-group protocol involved.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<OwnedMessage>> {
    read_topic_until(bootstrap, topic, timeout, |records| records.len() >= want)
}

/// Reads `topic` from the beginning until `done(records so far)` or `timeout`.
pub fn read_topic_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "fleetgate-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        bail!("topic {topic} has no partitions");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while !done(&out) && Instant::now() < deadline {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            out.push(msg?.detach());
        }
    }
    Ok(out)
}

/// A header of a record as UTF-8.
pub fn header(msg: &OwnedMessage, key: &str) -> Option<String> {
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Decodes a record value as `T`.
pub fn decode<T: prost::Message + Default>(msg: &OwnedMessage) -> anyhow::Result<T> {
    Ok(T::decode(msg.payload().context("record has no value")?)?)
}

/// The `fleetgate_proto` types, re-exported for test convenience.
pub use fleetgate_proto as proto;
