//! Pure helpers for `sre_kit_e2e.rs`: which metric names the SRE kit (dashboard and
//! alert rules) depends on, whether a Prometheus scrape serves them, and whether every
//! alert's runbook link lands on a heading of docs/operations.md. No I/O beyond
//! reading the kit's files, so the parsing is unit-tested on literals.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "fleetgate_";
/// Series suffixes a histogram (or summary) adds to its base name.
pub const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];
/// Metrics served by `fleetgate-processor run` rather than by ingest.
pub const PROCESSOR_PREFIX: &str = "fleetgate_processor_";

/// The repository root (this crate lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the ingest crate sits inside the workspace")
        .to_path_buf()
}

/// Every file of the SRE kit that names metrics: `deploy/grafana/*.json` and
/// `deploy/prometheus/*.yml|*.yaml`, sorted.
pub fn kit_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (dir, exts) in [
        ("deploy/grafana", &["json"][..]),
        ("deploy/prometheus", &["yml", "yaml"][..]),
    ] {
        let entries =
            std::fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("reading {dir}: {e}"));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if exts.contains(&ext) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Metric base names referenced in `text`: every `fleetgate_[a-z0-9_]+` word, with a
/// histogram's `_bucket`/`_sum`/`_count` suffix removed.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let is_name_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(PREFIX).map(|i| from + i) {
        let mut end = at + PREFIX.len();
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        from = end;
        // Part of a longer word (e.g. `my_fleetgate_x`) is not a fleetgate metric.
        let starts_word =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !starts_word || end == at + PREFIX.len() {
            continue;
        }
        let name = &text[at..end];
        let base = HISTOGRAM_SUFFIXES
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_owned());
    }
    names
}

/// Series names in a Prometheus text exposition (comments skipped).
pub fn served_series(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Whether `base` is served, as itself or as a histogram's series.
pub fn is_served(served: &BTreeSet<String>, base: &str) -> bool {
    served.contains(base)
        || HISTOGRAM_SUFFIXES
            .iter()
            .any(|s| served.contains(&format!("{base}{s}")))
}

/// `names` that `scrape` does not serve.
pub fn missing<'a>(names: impl IntoIterator<Item = &'a String>, scrape: &str) -> Vec<String> {
    let served = served_series(scrape);
    names
        .into_iter()
        .filter(|n| !is_served(&served, n))
        .cloned()
        .collect()
}

/// Anchors of `runbook_url: ".../operations.md#anchor"` annotations.
pub fn runbook_anchors(rules_yaml: &str) -> Vec<String> {
    rules_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url:"))
        .map(|v| v.trim().trim_matches('"').trim_matches('\''))
        .map(|url| {
            let (doc, anchor) = url.split_once('#').unwrap_or((url, ""));
            assert!(
                doc.ends_with("operations.md") && !anchor.is_empty(),
                "runbook_url {url:?} must point at a section of docs/operations.md"
            );
            anchor.to_owned()
        })
        .collect()
}

/// Alert names (`- alert: Name`) in a rules file.
pub fn alert_names(rules_yaml: &str) -> Vec<String> {
    rules_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// GitHub-style anchors of the Markdown headings in `doc`: lower-cased, spaces to
/// `-`, punctuation other than `-` and `_` dropped.
pub fn heading_anchors(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}
