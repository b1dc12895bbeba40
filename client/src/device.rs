//! A device as a vehicle runs it: assigns sequence numbers, keeps every event until
//! ingest has given it a final verdict, reconnects after a broken connection and
//! retransmits, and waits `retry_after_ms` before resending retryable events. The
//! same API over gRPC and QUIC. Never drops an event that was not acknowledged.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetgate_proto::{Location, SessionContext, Signal, TelemetryBatch, TelemetryEvent, Verdict};

use crate::{ClientError, ClientTls, GrpcDevice, QuicDevice};

/// Where and how to reach ingest.
#[derive(Debug, Clone)]
pub enum Target {
    /// `https://host:port`
    Grpc(String),
    Quic(SocketAddr),
}

enum Link {
    Grpc(GrpcDevice),
    Quic(QuicDevice),
}

impl Link {
    async fn send(
        &mut self,
        batch: &TelemetryBatch,
    ) -> Result<fleetgate_proto::BatchAck, ClientError> {
        match self {
            Self::Grpc(d) => d.send(batch).await,
            Self::Quic(d) => d.send(batch).await,
        }
    }
}

/// What one [`Device::flush`] achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushReport {
    pub accepted: u64,
    /// Final rejects as `(seq, reason)`; these events are not kept.
    pub rejected: Vec<(u64, String)>,
    pub retries: u64,
    pub reconnects: u64,
}

/// A device with its outbox of unacknowledged events.
pub struct Device {
    target: Target,
    tls: ClientTls,
    link: Option<Link>,
    next_seq: u64,
    next_batch: u64,
    outbox: VecDeque<TelemetryEvent>,
    session: SessionContext,
    max_batch: usize,
}

impl Device {
    /// `first_seq` continues where the device left off (sequence numbers never repeat).
    pub fn new(target: Target, tls: ClientTls, session: SessionContext, first_seq: u64) -> Self {
        Self {
            target,
            tls,
            link: None,
            next_seq: first_seq.max(1),
            next_batch: 1,
            outbox: VecDeque::new(),
            session,
            max_batch: 500,
        }
    }

    /// Queues a sample; returns its sequence number.
    pub fn record(
        &mut self,
        captured_at_ms: i64,
        signals: Vec<Signal>,
        location: Option<Location>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.push_back(TelemetryEvent {
            seq,
            captured_at_ms,
            signals,
            location,
        });
        seq
    }

    /// Events not yet finally acknowledged.
    pub fn unacked(&self) -> usize {
        self.outbox.len()
    }

    /// Sends the outbox until it is empty or `deadline` passes. Connection errors
    /// drop the link and reconnect (with back-off); retryable verdicts wait for the
    /// server's `retry_after_ms`. Unsent events stay in the outbox.
    pub async fn flush(&mut self, deadline: Duration) -> Result<FlushReport, ClientError> {
        let start = tokio::time::Instant::now();
        let mut report = FlushReport::default();
        let mut backoff = Duration::from_millis(50);
        let mut last_error = None;
        while !self.outbox.is_empty() {
            if start.elapsed() > deadline {
                return Err(last_error.unwrap_or(ClientError::Timeout(deadline)));
            }
            if self.link.is_none() {
                match self.connect().await {
                    Ok(link) => self.link = Some(link),
                    Err(e) => {
                        last_error = Some(e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
                report.reconnects += 1;
            }
            let n = self.outbox.len().min(self.max_batch);
            let batch = TelemetryBatch {
                schema_version: 1,
                batch_id: self.next_batch,
                sent_at_ms: unix_ms_now(),
                session: Some(self.session.clone()),
                events: self.outbox.iter().take(n).cloned().collect(),
                ..Default::default()
            };
            self.next_batch += 1;
            let link = self.link.as_mut().expect("connected above");
            let ack = match link.send(&batch).await {
                Ok(ack) => ack,
                Err(e) => {
                    // Unknown outcome: keep everything and resend on a new connection.
                    self.link = None;
                    last_error = Some(e);
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            let mut retry = Vec::new();
            match ack.batch_verdict() {
                Verdict::Accepted | Verdict::Unspecified => {
                    for (event, e) in self.outbox.drain(..n).zip(ack.events.iter()) {
                        match e.verdict() {
                            Verdict::Accepted => report.accepted += 1,
                            Verdict::Rejected => {
                                report.rejected.push((event.seq, e.reason.clone()))
                            }
                            Verdict::Retry | Verdict::Unspecified => retry.push(event),
                        }
                    }
                }
                Verdict::Retry => retry.extend(self.outbox.drain(..n)),
                Verdict::Rejected => {
                    report.rejected.extend(
                        self.outbox
                            .drain(..n)
                            .map(|e| (e.seq, ack.batch_reason.clone())),
                    );
                }
            }
            if !retry.is_empty() {
                report.retries += retry.len() as u64;
                // Retried events go first again, in their original order.
                for event in retry.into_iter().rev() {
                    self.outbox.push_front(event);
                }
                let wait = Duration::from_millis(u64::from(ack.retry_after_ms.max(50)));
                tokio::time::sleep(wait).await;
            }
        }
        Ok(report)
    }

    async fn connect(&self) -> Result<Link, ClientError> {
        Ok(match &self.target {
            Target::Grpc(endpoint) => Link::Grpc(GrpcDevice::connect(endpoint, &self.tls).await?),
            Target::Quic(addr) => Link::Quic(QuicDevice::connect(*addr, &self.tls).await?),
        })
    }
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
