//! The one place that turns a frame into Kafka records and a `BatchAck`, shared by the
//! gRPC and QUIC adapters. Ordering: records are enqueued synchronously in batch order
//! (key = device id), and after the first enqueue failure every later event of the
//! batch is answered `overloaded` rather than enqueued, so a retry cannot overtake it.
//! The returned future resolves only after Kafka answered for every enqueued record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_proto::{BatchAck, EventAck, Provenance, Verdict};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;

use crate::connection::{ConnectionContext, SessionState};
use crate::envelope::{batch_provenance, device_state_record, reject_record, BatchRecords};
use crate::events;
use crate::identity::{DeviceId, FleetId};
use crate::pipeline::{Checked, Pipeline, Refusal};
use crate::publish::{Delivery, EnqueueError, RecordSink};
use crate::quarantine::QuarantineTable;
use crate::quota::{Admission, BatchPermit, InFlightPermit, Limit};
use crate::reject::RejectReason;
use crate::replay::ReplayWindows;

/// Runs the pipeline for each frame and publishes the outcome.
pub struct BatchHandler {
    pipeline: Pipeline,
    quarantine: Arc<QuarantineTable>,
    admission: Arc<Admission>,
    offenders: Offenders,
    sink: Arc<dyn RecordSink>,
    node_id: Arc<str>,
    retry_after: Duration,
}

/// Held until the batch is answered: its share of the in-flight bound and its slot
/// among the connection's batches.
struct Admitted {
    _in_flight: InFlightPermit,
    _batch: Option<BatchPermit>,
}

/// Rate-limited batches per device since the last top-offenders log line.
#[derive(Default)]
struct Offenders(dashmap::DashMap<String, u64>);

/// Writes one device's `fleet.device-state.v1` record from its current window.
struct StateWriter {
    sink: Arc<dyn RecordSink>,
    base: Provenance,
    replay: Arc<ReplayWindows>,
    fleet: FleetId,
    device: DeviceId,
}

impl StateWriter {
    /// Enqueues the record now; the future says whether Kafka stored it.
    fn write(&self, now_ms: i64) -> BoxFuture<'static, Result<(), String>> {
        let (highest, unstored, pending) = self.replay.with(&self.fleet, &self.device, |w| {
            (w.highest(), w.unstored(), w.pending())
        });
        let record = device_state_record(&self.base, highest, unstored, pending, now_ms);
        match self.sink.enqueue(record) {
            Ok(d) => d.map(|r| r.map_err(|e| e.0)).boxed(),
            Err(e) => futures::future::ready(Err(e.to_string())).boxed(),
        }
    }

    fn has_local_in_flight(&self) -> bool {
        self.replay
            .with(&self.fleet, &self.device, |w| w.has_local_in_flight())
    }
}

/// How one event of a batch ends up.
enum Slot {
    /// Enqueued; `Some(Quarantined)` when it went to the quarantine topic.
    Pending(u64, Delivery, Option<RejectReason>),
    Done(u64, RejectReason),
}

impl BatchHandler {
    pub fn new(
        pipeline: Pipeline,
        quarantine: Arc<QuarantineTable>,
        admission: Arc<Admission>,
        sink: Arc<dyn RecordSink>,
        node_id: &str,
        retry_after: Duration,
    ) -> Self {
        Self {
            pipeline,
            quarantine,
            admission,
            offenders: Offenders::default(),
            sink,
            node_id: Arc::from(node_id),
            retry_after,
        }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Logs the devices refused most since the last call, then forgets them: who is
    /// flooding goes to logs, not to metric labels.
    pub fn log_top_offenders(&self, n: usize) {
        let mut all: Vec<(String, u64)> = Vec::new();
        self.offenders.0.retain(|k, v| {
            all.push((k.clone(), *v));
            false
        });
        all.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        for (device, batches) in all.into_iter().take(n) {
            tracing::warn!(device, batches, "top rate-limited device");
        }
    }

    /// Overload first (it costs no tokens), then the connection's batch slot, then
    /// the device, fleet and node quotas. `Err` = refuse the batch with this reason.
    fn admit(
        &self,
        conn: &ConnectionContext,
        events: u32,
        bytes: usize,
    ) -> Result<Admitted, (RejectReason, Option<Duration>)> {
        let in_flight = self
            .admission
            .in_flight
            .admit(events, Instant::now())
            .map_err(|cause| {
                events::overload_shed(cause.as_str());
                (RejectReason::Overloaded, None)
            })?;
        let batch = match &conn.slot {
            Some(slot) => Some(slot.try_start_batch().map_err(|refusal| {
                events::overload_shed(refusal.code());
                (RejectReason::Overloaded, None)
            })?),
            None => None,
        };
        let id = &conn.identity;
        self.admission
            .quotas
            .check(
                id.fleet_id.as_str(),
                id.device_id.as_str(),
                events,
                bytes.min(u32::MAX as usize) as u32,
            )
            .map_err(|refusal| {
                let reason = match refusal.limit {
                    Limit::Device => RejectReason::RateLimitedDevice,
                    Limit::Fleet => RejectReason::RateLimitedFleet,
                    Limit::Global => RejectReason::RateLimitedGlobal,
                };
                events::rate_limited(reason, id.fleet_id.as_str(), refusal.dimension.as_str());
                *self
                    .offenders
                    .0
                    .entry(format!("{}/{}", id.fleet_id, id.device_id))
                    .or_default() += 1;
                (reason, Some(refusal.retry_after))
            })?;
        Ok(Admitted {
            _in_flight: in_flight,
            _batch: batch,
        })
    }

    /// Checks `frame`, enqueues its records, and returns the ack to send once Kafka
    /// has answered. `received_at_ms` is the server clock at receipt.
    pub fn submit(
        &self,
        conn: &ConnectionContext,
        session: &mut SessionState,
        frame: &[u8],
        received_at_ms: i64,
    ) -> BoxFuture<'static, BatchAck> {
        let started = Instant::now();
        let transport = conn.transport;
        let frame_len = frame.len();
        let retry_after_ms = self.retry_after.as_millis().min(u32::MAX as u128) as u32;
        match self.pipeline.check(&conn.identity, frame, received_at_ms) {
            Checked::Refused { batch_id, refusal } => {
                let base = batch_provenance(&self.node_id, conn, session, received_at_ms, 0, 0);
                let audit = self.audit(
                    reject_record(&base, None, &refusal, frame_len),
                    refusal.reason,
                );
                events::batch_rejected(transport, refusal.reason);
                tracing::info!(
                    device = %conn.identity.device_id,
                    connection = %conn.connection_id,
                    reason = refusal.reason.as_str(),
                    detail = %refusal.detail,
                    "batch rejected"
                );
                async move {
                    if let Some(a) = audit {
                        a.await;
                    }
                    let verdict = refusal.reason.verdict();
                    let outcome = if verdict == Verdict::Retry {
                        "retry"
                    } else {
                        "rejected"
                    };
                    events::batch_done(transport, outcome, started.elapsed(), frame_len);
                    BatchAck {
                        batch_id,
                        events: Vec::new(),
                        batch_verdict: verdict as i32,
                        batch_reason: refusal.reason.as_str().to_owned(),
                        retry_after_ms: if verdict == Verdict::Retry {
                            retry_after_ms
                        } else {
                            0
                        },
                    }
                }
                .boxed()
            }
            Checked::Events { batch, verdicts } => {
                let admitted = verdicts.iter().filter(|v| v.is_ok()).count() as u32;
                let permits = match self.admit(conn, admitted, frame_len) {
                    Ok(p) => p,
                    Err((reason, retry)) => {
                        // Nothing of the batch is published: free its reserved seqs so
                        // the retry is accepted.
                        let reserved: Vec<u64> = batch
                            .events
                            .iter()
                            .zip(&verdicts)
                            .filter(|(_, v)| v.is_ok())
                            .map(|(e, _)| e.seq)
                            .collect();
                        let id = &conn.identity;
                        self.pipeline
                            .replay()
                            .with(&id.fleet_id, &id.device_id, |w| {
                                reserved.iter().for_each(|s| w.release(*s))
                            });
                        events::batch_rejected(transport, reason);
                        let retry_ms = retry
                            .map(|d| d.as_millis().clamp(1, u32::MAX as u128) as u32)
                            .unwrap_or(retry_after_ms);
                        events::batch_done(transport, "retry", started.elapsed(), frame_len);
                        let ack = BatchAck {
                            batch_id: batch.batch_id,
                            events: Vec::new(),
                            batch_verdict: Verdict::Retry as i32,
                            batch_reason: reason.as_str().to_owned(),
                            retry_after_ms: retry_ms,
                        };
                        return futures::future::ready(ack).boxed();
                    }
                };
                session.update(batch.session.as_ref());
                let base = batch_provenance(
                    &self.node_id,
                    conn,
                    session,
                    received_at_ms,
                    batch.sent_at_ms,
                    batch.schema_version,
                );
                let records = BatchRecords::new(base);
                let base = records.base();
                let batch_id = batch.batch_id;
                let diverted = self.quarantine.check(
                    &conn.identity.fleet_id,
                    &conn.identity.device_id,
                    received_at_ms,
                );
                let mut slots = Vec::with_capacity(batch.events.len());
                let mut audits = Vec::new();
                let mut halted: Option<RejectReason> = None;
                let replay = self.pipeline.replay().clone();
                let (fleet, device) = (
                    conn.identity.fleet_id.clone(),
                    conn.identity.device_id.clone(),
                );
                let mut unreserve = Vec::new();
                for (event, verdict) in batch.events.into_iter().zip(verdicts) {
                    let seq = event.seq;
                    match verdict {
                        Err(refusal) => {
                            audits.extend(self.audit(
                                reject_record(base, Some(&event), &refusal, frame_len),
                                refusal.reason,
                            ));
                            log_event_reject(conn, seq, &refusal);
                            slots.push(Slot::Done(seq, refusal.reason));
                        }
                        Ok(()) => {
                            if let Some(reason) = halted {
                                unreserve.push(seq);
                                slots.push(Slot::Done(seq, reason));
                                continue;
                            }
                            let record = match &diverted {
                                Some(decision) => records.quarantined_record(&event, decision),
                                None => records.event_record(&event),
                            };
                            let outcome = diverted.as_ref().map(|_| RejectReason::Quarantined);
                            match self.sink.enqueue(record) {
                                Ok(d) => {
                                    let (replay, fleet, device) =
                                        (replay.clone(), fleet.clone(), device.clone());
                                    let delivered = self.admission.in_flight.clone();
                                    // Seen for good only once Kafka acked; a failure frees the seq for the retry.
                                    let enqueued = Instant::now();
                                    let settled = d
                                        .map(move |r| {
                                            if r.is_ok() {
                                                events::kafka_delivered(enqueued.elapsed());
                                            }
                                            delivered.record_delivery(
                                                enqueued.elapsed(),
                                                Instant::now(),
                                            );
                                            replay.with(&fleet, &device, |w| match &r {
                                                Ok(()) => w.commit(seq),
                                                Err(_) => w.release(seq),
                                            });
                                            r
                                        })
                                        .boxed();
                                    slots.push(Slot::Pending(seq, settled, outcome));
                                }
                                Err(e) => {
                                    unreserve.push(seq);
                                    let reason = match e {
                                        EnqueueError::QueueFull => RejectReason::Overloaded,
                                        EnqueueError::Refused(_) => RejectReason::DeliveryFailed,
                                    };
                                    events::kafka_enqueue_failed(&e);
                                    halted = Some(reason);
                                    slots.push(Slot::Done(seq, reason));
                                }
                            }
                        }
                    }
                }
                if !unreserve.is_empty() {
                    replay.with(&fleet, &device, |w| {
                        unreserve.iter().for_each(|s| w.release(*s))
                    });
                }
                // The device's state is written alongside its events, naming the seqs
                // still being delivered as pending, so the ack waits for one Kafka round
                // trip and an acked event is still never replayable elsewhere.
                let state = slots
                    .iter()
                    .any(|s| matches!(s, Slot::Pending(..)))
                    .then(|| StateWriter {
                        sink: self.sink.clone(),
                        base: base.clone(),
                        replay,
                        fleet,
                        device,
                    });
                let pending_written = state.as_ref().map(|w| w.write(received_at_ms));
                let in_flight = self.admission.in_flight.clone();
                async move {
                    let _permits = permits;
                    let audits = join_all(audits);
                    let acks = join_all(slots.into_iter().map(|slot| async move {
                        match slot {
                            Slot::Pending(seq, d, outcome) => match d.await {
                                Ok(()) => (seq, outcome),
                                Err(e) => {
                                    events::kafka_delivery_failed(&e.0);
                                    (seq, Some(RejectReason::DeliveryFailed))
                                }
                            },
                            Slot::Done(seq, reason) => (seq, Some(reason)),
                        }
                    }));
                    let pending_written = async {
                        match pending_written {
                            Some(written) => written.await,
                            None => Ok(()),
                        }
                    };
                    let (acks, _, written) = futures::join!(acks, audits, pending_written);
                    if let Err(e) = written {
                        events::device_state_write_failed(&e);
                    }
                    // The device's last delivery to settle writes the outcome; the
                    // earlier ones are covered by that record.
                    if let Some(state) = state.filter(|s| !s.has_local_in_flight()) {
                        let settled = state.write(crate::clock::unix_ms_now());
                        tokio::spawn(async move {
                            if let Err(e) = settled.await {
                                events::device_state_write_failed(&e);
                            }
                        });
                    }
                    events::events_in_flight(in_flight.in_flight());
                    finish(
                        batch_id,
                        acks,
                        transport,
                        started,
                        frame_len,
                        retry_after_ms,
                    )
                }
                .boxed()
            }
        }
    }

    /// Audits a connection-level finding (cloned credential, revocation) on the
    /// rejected topic, with the connection's provenance and `detail` as evidence.
    pub fn audit_connection(&self, conn: &ConnectionContext, reason: RejectReason, detail: String) {
        let now = crate::clock::unix_ms_now();
        let base = batch_provenance(&self.node_id, conn, &SessionState::default(), now, 0, 0);
        let refusal = Refusal::new(reason, detail);
        if let Some(done) = self.audit(reject_record(&base, None, &refusal, 0), reason) {
            tokio::spawn(done);
        }
    }

    /// Enqueues an audit record; its failure is counted but does not change the
    /// verdict (the content was rejected either way).
    fn audit(
        &self,
        record: crate::envelope::OutRecord,
        reason: RejectReason,
    ) -> Option<BoxFuture<'static, ()>> {
        if !reason.audited() {
            return None;
        }
        match self.sink.enqueue(record) {
            Ok(d) => Some(
                d.map(move |r| {
                    if let Err(e) = r {
                        events::audit_record_failed(reason, &e.0);
                    }
                })
                .boxed(),
            ),
            Err(e) => {
                events::audit_record_failed(reason, &e.to_string());
                None
            }
        }
    }
}

fn log_event_reject(conn: &ConnectionContext, seq: u64, refusal: &Refusal) {
    tracing::info!(
        device = %conn.identity.device_id,
        connection = %conn.connection_id,
        seq,
        reason = refusal.reason.as_str(),
        detail = %refusal.detail,
        "event rejected"
    );
}

fn finish(
    batch_id: u64,
    acks: Vec<(u64, Option<RejectReason>)>,
    transport: crate::connection::Transport,
    started: Instant,
    frame_len: usize,
    retry_after_ms: u32,
) -> BatchAck {
    let mut accepted = 0u64;
    let mut any_retry = false;
    let events = acks
        .into_iter()
        .map(|(seq, reason)| match reason {
            None => {
                accepted += 1;
                EventAck {
                    seq,
                    verdict: Verdict::Accepted as i32,
                    reason: String::new(),
                }
            }
            Some(r) => {
                events::event_rejected(transport, r, 1);
                any_retry |= r.verdict() == Verdict::Retry;
                EventAck {
                    seq,
                    verdict: r.verdict() as i32,
                    reason: r.as_str().to_owned(),
                }
            }
        })
        .collect::<Vec<_>>();
    events::events_accepted(transport, accepted);
    let outcome = match (accepted as usize == events.len(), accepted, any_retry) {
        (true, _, _) => "accepted",
        (false, 0, true) => "retry",
        (false, 0, false) => "rejected",
        _ => "partial",
    };
    events::batch_done(transport, outcome, started.elapsed(), frame_len);
    BatchAck {
        batch_id,
        events,
        batch_verdict: Verdict::Accepted as i32,
        batch_reason: String::new(),
        retry_after_ms: if any_retry { retry_after_ms } else { 0 },
    }
}
