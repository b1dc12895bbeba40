//! The SRE kit's contract with the running processes: every `fleetgate_*` metric that
//! the Grafana dashboard (`deploy/grafana/*.json`) or the alert rules
//! (`deploy/prometheus/*.yml`) query must be served on `/metrics` by a real process
//! (ingest for most names, `fleetgate-processor run` for `fleetgate_processor_*`),
//! so a renamed or dropped metric breaks this test instead of silently blanking a
//! panel or disarming an alert. Also checks what docs/operations.md promises about
//! `/healthz`, `/readyz` and logs, and that every alert's runbook link resolves.
//!
//! Real stack: tansu broker over TCP, real mTLS, the real `fleetgate-ingest` binary.

mod common;
mod sre_kit;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleetgate_test_support::{free_port, http_get, ready_field, Broker, StdoutLines, TestPki};
use sre_kit::*;

/// Every metric name the kit references, split into (ingest, processor).
fn kit_metric_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let root = repo_root();
    let files = kit_files(&root);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "json"))
            && files
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "yml")),
        "the kit has a dashboard and alert rules: {files:?}"
    );
    let mut all = BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("reading kit file");
        let names = metric_names(&text);
        assert!(
            !names.is_empty(),
            "{} names no fleetgate metric",
            f.display()
        );
        all.extend(names);
    }
    all.into_iter()
        .partition(|n: &String| !n.starts_with(PROCESSOR_PREFIX))
}

/// A production-shaped stack: ingest with a CRL configured (one device revoked), as
/// deploy/k8s runs it. `env` adds `FLEETGATE_*` overrides.
fn stack_with_crl(env: &[(&str, &str)]) -> (Stack, fleetgate_pki::Issued) {
    let broker = Broker::start().expect("broker");
    let pki = TestPki::new().expect("pki");
    let revoked = pki.device("fleet-a", "revoked-1");
    let crl = pki.write_crl(&[revoked.serial_hex.as_str()]);
    let crl = crl.to_str().expect("temp paths are UTF-8");
    let mut all = vec![("FLEETGATE_TLS__CRL", crl)];
    all.extend_from_slice(env);
    let ingest = spawn_ingest(&broker, &pki, "", &all);
    (
        Stack {
            broker,
            pki,
            ingest,
        },
        revoked,
    )
}

/// Good and bad traffic over both transports, so labelled series and histograms
/// (which appear only once observed) exist.
async fn drive_traffic(stack: &Stack, revoked: &fleetgate_pki::Issued) {
    let mut grpc = stack.device_on(Wire::Grpc, "fleet-a", "car-1").await;
    let ack = grpc
        .send(&batch(1, vec![event(1, 10.0), event(2, 11.0)]))
        .await
        .expect("good gRPC batch");
    assert!(all_accepted(&ack), "{ack:?}");
    // field_out_of_range: an event-level reject.
    let ack = grpc
        .send(&batch(2, vec![event(3, 12.0), event(4, 9_999.0)]))
        .await
        .expect("partly bad batch");
    assert_eq!(ack.events.len(), 2);
    // identity_mismatch: a batch-level reject.
    let mut foreign = batch(3, vec![event(5, 13.0)]);
    foreign.device_id = "someone-else".into();
    let ack = grpc
        .send(&foreign)
        .await
        .expect("foreign batch is answered");
    assert_eq!(ack.batch_reason, "identity_mismatch", "{ack:?}");
    grpc.close().await;

    let mut quic = stack.device_on(Wire::Quic, "fleet-b", "van-1").await;
    let ack = quic
        .send(&batch(1, vec![event(1, 20.0)]))
        .await
        .expect("good QUIC batch");
    assert!(all_accepted(&ack), "{ack:?}");
    quic.close().await;

    // A revoked certificate is refused at the handshake (TLS 1.3 clients may only
    // notice on their first request).
    if let Ok(mut d) = stack.connect_on(Wire::Grpc, Some(revoked)).await {
        assert!(d.send(&batch(1, vec![event(1, 1.0)])).await.is_err());
    }
    let refused = eventually_at_least(1.0, || {
        stack.metric_on(
            Wire::Grpc,
            "fleetgate_handshakes_total",
            &[("outcome", "cert_revoked")],
        )
    })
    .await;
    // At least once: the client may retry the handshake.
    assert!(refused >= 1.0, "revoked certificate refused: {refused}");

    let accepted = eventually_at_least(4.0, || {
        stack
            .ingest
            .metric("fleetgate_events_accepted_total", &[])
            .expect("metrics scrape")
    })
    .await;
    assert_eq!(accepted, 4.0, "three events over gRPC, one over QUIC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_serves_every_metric_the_dashboard_and_alerts_query() {
    let (ingest_names, _) = kit_metric_names();
    let (stack, revoked) = stack_with_crl(&[]);
    drive_traffic(&stack, &revoked).await;

    // Delivery latency is recorded when the broker's ack arrives: allow a moment.
    let mut absent = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        absent = missing(&ingest_names, &stack.ingest.scrape().expect("scrape"));
        if absent.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        absent.is_empty(),
        "{} of {} metric names in deploy/grafana and deploy/prometheus are not served by \
         fleetgate-ingest /metrics: {absent:#?}",
        absent.len(),
        ingest_names.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_json_logs_match_the_operations_guide() {
    let (stack, revoked) = stack_with_crl(&[("FLEETGATE_LOG_FORMAT", "json")]);
    let metrics = stack.ingest.metrics;

    let healthz = http_get(metrics, "/healthz").expect("GET /healthz");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert_eq!(
        wait_for_status(metrics, "200", Duration::from_secs(15)),
        "ready"
    );

    // Ready means the broker answers: a frozen broker turns it to 503 within the
    // readiness period, and a thawed one back to 200.
    stack.broker.freeze();
    let body = wait_for_status(metrics, "503", Duration::from_secs(30));
    stack.broker.thaw();
    assert_eq!(body, "kafka unreachable");
    let healthz = http_get(metrics, "/healthz").expect("GET /healthz");
    assert!(
        healthz.starts_with("HTTP/1.1 200"),
        "liveness does not depend on Kafka: {healthz}"
    );
    assert_eq!(
        wait_for_status(metrics, "200", Duration::from_secs(30)),
        "ready"
    );

    drive_traffic(&stack, &revoked).await;
    let server_key = std::fs::read_to_string(stack.pki.dir().join("server.key"))
        .expect("server key written by TestPki");
    let logs = stack.ingest.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains("\"batch rejected\"")),
        "rejects are logged: {logs}"
    );
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON object: {line}"
        );
        for field in ["\"timestamp\"", "\"level\"", "\"fields\"", "\"target\""] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }
    // No key or certificate material, ever: not the PEM markers, and not the first
    // base64 line of the server key or of the certificate and key the revoked device
    // handshook with (a PEM or base64-DER leak would contain it verbatim).
    let first_body_line = |pem: &str| -> String {
        pem.lines()
            .find(|l| !l.starts_with("-----") && !l.trim().is_empty())
            .expect("PEM has a body")
            .to_owned()
    };
    for secret in [
        "PRIVATE KEY".to_owned(),
        "BEGIN CERTIFICATE".to_owned(),
        first_body_line(&server_key),
        first_body_line(&revoked.key_pem),
        first_body_line(&revoked.cert_pem),
    ] {
        assert!(!logs.contains(&secret), "logs leak {secret:?}");
    }
}

/// Polls `/readyz` until its status code is `code`; returns the body.
fn wait_for_status(metrics: SocketAddr, code: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        last = http_get(metrics, "/readyz").unwrap_or_default();
        if last.starts_with(&format!("HTTP/1.1 {code}")) {
            return last
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.trim().to_owned())
                .unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("/readyz never answered {code} within {timeout:?}; last: {last}");
}

/// `fleetgate-processor`: `$FLEETGATE_PROCESSOR_BIN`, else beside the ingest binary
/// (the same target dir; `cargo build -p fleetgate-processor` puts it there).
fn processor_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETGATE_PROCESSOR_BIN") {
        return PathBuf::from(p);
    }
    ingest_bin().with_file_name(format!(
        "fleetgate-processor{}",
        std::env::consts::EXE_SUFFIX
    ))
}

/// A `fleetgate-processor run` child, killed on drop.
struct ProcessorRun {
    child: Child,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProcessorRun {
    fn spawn(bootstrap: &str, metrics: SocketAddr) -> Self {
        let bin = processor_bin();
        assert!(
            bin.is_file(),
            "{} missing: run `cargo build -p fleetgate-processor` first or set FLEETGATE_PROCESSOR_BIN",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = dir.path().join("processor.log");
        let child = Command::new(&bin)
            .arg("run")
            .env("FLEETGATE_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
            .env("FLEETGATE_METRICS__LISTEN", metrics.to_string())
            .env("FLEETGATE_LOG", "info,rdkafka=warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        Self {
            child,
            stderr,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The processor's stdout, to find its `fleetgate-processor ready ... metrics=ADDR`
    /// line if it prints one.
    fn stdout_lines(&mut self) -> StdoutLines {
        StdoutLines::take(&mut self.child).expect("piped stdout")
    }
}

impl Drop for ProcessorRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_serves_every_processor_metric_the_dashboard_and_alerts_query() {
    let (_, processor_names) = kit_metric_names();
    assert!(
        !processor_names.is_empty(),
        "the kit watches the processor (lag, findings, quarantine decisions)"
    );
    let (stack, revoked) = stack_with_crl(&[]);
    drive_traffic(&stack, &revoked).await;

    let requested: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("loopback address");
    let mut processor = ProcessorRun::spawn(&stack.broker.bootstrap(), requested);
    let announced = processor.stdout_lines();
    let mut addr = requested;
    let mut absent: Vec<String> = processor_names.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = processor.child.try_wait().expect("polling processor") {
            panic!(
                "`fleetgate-processor run` exited ({status}) before serving metrics:\n{}",
                processor.logs()
            );
        }
        if let Some(a) = announced
            .wait_for("fleetgate-processor ready", Duration::ZERO)
            .and_then(|line| ready_field(&line, "metrics=").ok())
        {
            addr = a;
        }
        if let Ok(scrape) = http_get(addr, "/metrics") {
            absent = missing(&processor_names, &scrape);
            if absent.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        absent.is_empty(),
        "{} of {} fleetgate_processor_* names in the kit are not served by \
         `fleetgate-processor run` at {addr}/metrics: {absent:#?}\nprocessor log:\n{}",
        absent.len(),
        processor_names.len(),
        processor.logs()
    );
}

#[test]
fn every_alert_has_severity_summary_description_and_a_runbook_section() {
    let root = repo_root();
    let operations = std::fs::read_to_string(root.join("docs/operations.md"))
        .expect("docs/operations.md exists");
    let sections = heading_anchors(&operations);
    let mut alerts = 0;
    for file in kit_files(&root)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e != "json"))
    {
        let text = std::fs::read_to_string(&file).expect("reading rules");
        let names = alert_names(&text);
        let anchors = runbook_anchors(&text);
        alerts += names.len();
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            let n = text
                .lines()
                .filter(|l| l.trim_start().starts_with(key))
                .count();
            assert_eq!(n, names.len(), "{}: one {key} per alert", file.display());
        }
        assert_eq!(
            anchors.len(),
            names.len(),
            "{}: one runbook per alert",
            file.display()
        );
        for (alert, anchor) in names.iter().zip(&anchors) {
            assert_eq!(
                anchor,
                &alert.to_lowercase(),
                "{alert}'s runbook anchor is named after it"
            );
            assert!(
                sections.contains(anchor),
                "docs/operations.md has no section #{anchor} for {alert}"
            );
        }
    }
    assert!(alerts >= 5, "only {alerts} alerts found");
}

#[test]
fn every_metric_the_kit_queries_is_documented_in_metrics_md() {
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md"))
        .expect("docs/metrics.md exists");
    let (ingest, processor) = kit_metric_names();
    let undocumented: Vec<_> = ingest
        .iter()
        .chain(&processor)
        .filter(|n| !doc.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/metrics.md has no table row for {undocumented:?}"
    );
}

mod parsing {
    use super::sre_kit::*;

    #[test]
    fn metric_names_strip_histogram_suffixes_and_ignore_lookalikes() {
        let text = r#"histogram_quantile(0.99, sum by (le) (rate(fleetgate_kafka_delivery_latency_seconds_bucket[5m])))
            / fleetgate_events_accepted_total{reason!~"x"} - fleetgate_x_sum + fleetgate_y_count
            runbook: docs/operations.md#fleetgaterejectspike job="fleetgate-ingest"
            my_fleetgate_shadow fleetgate_ alone"#;
        let names: Vec<_> = metric_names(text).into_iter().collect();
        assert_eq!(
            names,
            [
                "fleetgate_events_accepted_total",
                "fleetgate_kafka_delivery_latency_seconds",
                "fleetgate_x",
                "fleetgate_y",
            ]
        );
    }

    #[test]
    fn a_histogram_counts_as_served_through_its_series() {
        let scrape = "# TYPE fleetgate_lat_seconds histogram\n\
                      fleetgate_lat_seconds_bucket{le=\"0.1\"} 1\n\
                      fleetgate_lat_seconds_sum 0.05\n\
                      fleetgate_lat_seconds_count 1\n\
                      fleetgate_up{node=\"a b\"} 1\n\
                      # HELP fleetgate_only_described nothing\n";
        let names: Vec<String> = [
            "fleetgate_lat_seconds",
            "fleetgate_up",
            "fleetgate_only_described",
        ]
        .map(String::from)
        .into();
        assert_eq!(missing(&names, scrape), ["fleetgate_only_described"]);
    }

    #[test]
    fn runbook_anchors_follow_github_heading_slugs() {
        let doc = "# Operations\n### FleetgateRejectSpike\n## Certificate rotation (server)\n";
        let anchors = heading_anchors(doc);
        assert!(anchors.contains("fleetgaterejectspike"));
        assert!(anchors.contains("certificate-rotation-server"));
        let rules = "      - alert: FleetgateRejectSpike\n          runbook_url: \"docs/operations.md#fleetgaterejectspike\"\n";
        assert_eq!(alert_names(rules), ["FleetgateRejectSpike"]);
        assert_eq!(runbook_anchors(rules), ["fleetgaterejectspike"]);
    }

    #[test]
    #[should_panic(expected = "must point at a section")]
    fn a_runbook_elsewhere_is_refused() {
        runbook_anchors("runbook_url: https://wiki.example/fleetgate\n");
    }
}
