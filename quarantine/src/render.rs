//! How the CLI prints decisions: aligned text for people, JSON for scripts. The JSON
//! field names are part of the CLI's contract.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use fleetgate_proto::{Finding, QuarantineDecision, QuarantineState};
use fleetgate_quarantine::{is_active, Position, Verifier};
use serde_json::{json, Value};

/// RFC 3339 UTC with milliseconds, or "-" for 0.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

fn state(d: &QuarantineDecision, now_ms: i64) -> &'static str {
    match QuarantineState::try_from(d.state) {
        Ok(QuarantineState::Quarantined) if is_active(d, now_ms) => "quarantined",
        Ok(QuarantineState::Quarantined) => "expired",
        Ok(QuarantineState::Released) => "released",
        _ => "unspecified",
    }
}

fn finding_json(f: &Finding) -> Value {
    json!({
        "detector": f.detector,
        "fleet_id": f.fleet_id,
        "device_id": f.device_id,
        "score": f.score,
        "summary": f.summary,
        "detected_at_ms": f.detected_at_ms,
        "processor_id": f.processor_id,
        "first_offending_received_at_ms": f.first_offending_received_at_ms,
        "evidence": f.evidence.iter().map(|e| json!({
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "seq": e.seq,
            "quantity": e.quantity,
            "value": e.value,
            "threshold": e.threshold,
            "note": e.note,
        })).collect::<Vec<_>>(),
    })
}

fn decision_json(d: &QuarantineDecision, now_ms: i64) -> Value {
    json!({
        "fleet_id": d.fleet_id,
        "device_id": d.device_id,
        "state": state(d, now_ms),
        "active": is_active(d, now_ms),
        "reason": d.reason,
        "decided_by": d.decided_by,
        "decided_at_ms": d.decided_at_ms,
        "decided_at": time(d.decided_at_ms),
        "expires_at_ms": d.expires_at_ms,
        "decision_id": d.decision_id,
        "first_offending_received_at_ms": d.first_offending_received_at_ms,
        "signed": !d.signature.is_empty(),
        "evidence": d.evidence.iter().map(finding_json).collect::<Vec<_>>(),
    })
}

pub fn list_json(rows: &[&QuarantineDecision], now_ms: i64) -> Value {
    Value::Array(rows.iter().map(|d| decision_json(d, now_ms)).collect())
}

pub fn list_text(rows: &[&QuarantineDecision], now_ms: i64, all: bool) -> String {
    if rows.is_empty() {
        return if all {
            "no decisions\n".into()
        } else {
            "no devices quarantined\n".into()
        };
    }
    let header = [
        "DEVICE",
        "STATE",
        "DECIDED_BY",
        "DECIDED_AT",
        "EXPIRES",
        "REASON",
    ];
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|d| {
            [
                format!("{}/{}", d.fleet_id, d.device_id),
                state(d, now_ms).to_owned(),
                d.decided_by.clone(),
                time(d.decided_at_ms),
                time(d.expires_at_ms),
                d.reason.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &table {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// The signature verdict of one record, as JSON.
fn signature_json(d: &QuarantineDecision, verifier: Option<&Verifier>) -> Value {
    if d.signature.is_empty() && d.signer_cert_der.is_empty() {
        return json!({"status": "unsigned"});
    }
    let Some(verifier) = verifier else {
        return json!({"status": "not_checked", "error": "no --ca given"});
    };
    // Certificate validity is judged at the decision's own time, so records signed
    // with a since-expired operator certificate still verify in the audit trail.
    match verifier.verify(d, d.decided_at_ms) {
        Ok(who) => json!({
            "status": "verified",
            "operator": who.operator.name,
            "spiffe_id": who.operator.spiffe_id(),
            "cert_serial": who.cert_serial_hex,
            "cert_sha256": who.cert_sha256_hex,
        }),
        Err(e) => json!({"status": "invalid", "error": e.to_string()}),
    }
}

pub fn show_json(
    fleet: &str,
    device: &str,
    entries: &[(Position, QuarantineDecision)],
    verifier: Option<&Verifier>,
    now_ms: i64,
) -> Value {
    let active = entries.last().is_some_and(|(_, d)| is_active(d, now_ms));
    json!({
        "fleet_id": fleet,
        "device_id": device,
        "quarantined": active,
        "history": entries.iter().map(|(at, d)| {
            let mut v = decision_json(d, now_ms);
            v["partition"] = json!(at.partition);
            v["offset"] = json!(at.offset);
            v["signature"] = signature_json(d, verifier);
            v
        }).collect::<Vec<_>>(),
    })
}

pub fn show_text(
    fleet: &str,
    device: &str,
    entries: &[(Position, QuarantineDecision)],
    verifier: Option<&Verifier>,
    now_ms: i64,
) -> String {
    let mut out = String::new();
    let Some((_, latest)) = entries.last() else {
        let _ = writeln!(out, "{fleet}/{device}: no decisions");
        return out;
    };
    let _ = writeln!(out, "{fleet}/{device}: {}", state(latest, now_ms));
    for (at, d) in entries {
        let sig = signature_json(d, verifier);
        let signature = match sig["status"].as_str() {
            Some("verified") => format!(
                "verified, signed by {} (certificate serial {})",
                sig["spiffe_id"].as_str().unwrap_or_default(),
                sig["cert_serial"].as_str().unwrap_or_default()
            ),
            Some("invalid") => format!("INVALID: {}", sig["error"].as_str().unwrap_or_default()),
            Some("not_checked") => "not checked (no --ca given)".into(),
            _ => "unsigned".into(),
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "- {} at {} by {} (partition {} offset {})",
            state(d, now_ms),
            time(d.decided_at_ms),
            d.decided_by,
            at.partition,
            at.offset
        );
        let _ = writeln!(out, "  reason:    {}", d.reason);
        let _ = writeln!(out, "  decision:  {}", d.decision_id);
        if d.expires_at_ms > 0 {
            let _ = writeln!(out, "  expires:   {}", time(d.expires_at_ms));
        }
        if d.first_offending_received_at_ms > 0 {
            let _ = writeln!(
                out,
                "  first offending event received: {}",
                time(d.first_offending_received_at_ms)
            );
        }
        let _ = writeln!(out, "  signature: {signature}");
        for f in &d.evidence {
            let _ = writeln!(
                out,
                "  evidence:  {} score {:.2}: {}",
                f.detector, f.score, f.summary
            );
            for e in &f.evidence {
                let _ = writeln!(
                    out,
                    "             {}/{}@{} seq {} {}={} (threshold {}) {}",
                    e.topic, e.partition, e.offset, e.seq, e.quantity, e.value, e.threshold, e.note
                );
            }
        }
    }
    out
}
