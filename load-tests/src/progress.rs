//! Run progress for `replay` and `fleet`. Device tasks add their per-batch tallies to
//! shared atomic counters (never per event); one reporter task samples the counters
//! on a timer and draws indicatif bars when stderr is a terminal, or prints the plain
//! periodic lines bench scripts and CI logs rely on when it is not. Sampling, rates,
//! ETA and all text are pure (`RateWindow`, `View`) and tested without a terminal.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetgate_loadgen::report::DeviceOutcome;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often bars are redrawn from the counters (independent of `--progress-every`).
const BAR_REFRESH: Duration = Duration::from_millis(250);
/// Span the events/s shown next to a bar is averaged over.
const BAR_RATE_WINDOW: Duration = Duration::from_secs(3);

/// Where progress goes, decided once from the flags and whether stderr is a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// `--no-progress` or `--progress-every 0s`.
    Off,
    /// One plain line on stderr per interval (stderr is a file or pipe).
    Lines { every: Duration },
    /// indicatif bars on stderr, redrawn every `BAR_REFRESH`.
    Bars,
}

impl ProgressMode {
    pub fn choose(every: Duration, no_progress: bool, stderr_is_terminal: bool) -> Self {
        if no_progress || every.is_zero() {
            ProgressMode::Off
        } else if stderr_is_terminal {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines { every }
        }
    }
}

/// Counters shared by every device task of a run; each is bumped at most once per
/// batch or connection attempt.
#[derive(Debug, Default)]
pub struct RunCounters {
    batches: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicU64,
    connect_failed: AtomicU64,
}

/// What one device has already added to the shared counters, so it publishes only
/// the difference after each batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    batches: u64,
    accepted: u64,
    rejected: u64,
    reconnects: u64,
}

impl Tally {
    fn of(o: &DeviceOutcome) -> Self {
        Tally {
            batches: o.batches,
            accepted: o.accepted,
            rejected: o.rejected_total(),
            reconnects: o.reconnects,
        }
    }
}

impl RunCounters {
    /// Adds what `out` gained since `reported` and remembers it as reported.
    pub fn publish(&self, reported: &mut Tally, out: &DeviceOutcome) {
        let now = Tally::of(out);
        let add = |c: &AtomicU64, new: u64, old: u64| {
            if new > old {
                c.fetch_add(new - old, Ordering::Relaxed);
            }
        };
        add(&self.batches, now.batches, reported.batches);
        add(&self.accepted, now.accepted, reported.accepted);
        add(&self.rejected, now.rejected, reported.rejected);
        add(&self.reconnects, now.reconnects, reported.reconnects);
        *reported = now;
    }

    /// Counts a device's first connection attempt.
    pub fn connect_result(&self, ok: bool) {
        let c = if ok {
            &self.connected
        } else {
            &self.connect_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn sample(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            batches: get(&self.batches),
            accepted: get(&self.accepted),
            rejected: get(&self.rejected),
            reconnects: get(&self.reconnects),
            connected: get(&self.connected),
            connect_failed: get(&self.connect_failed),
        }
    }
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub batches: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub reconnects: u64,
    pub connected: u64,
    pub connect_failed: u64,
}

impl Counts {
    /// Events with a final answer (accepted or not); what the bar counts.
    pub fn acked(&self) -> u64 {
        self.accepted + self.rejected
    }
}

/// The fixed facts progress is measured against.
#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    /// `replay` or `fleet`, the start of each line.
    pub label: &'static str,
    pub total_events: u64,
    /// Devices whose connections are shown (`None`: not shown, e.g. a replay connects
    /// everyone before it starts).
    pub devices: Option<u64>,
    /// The recording's timeline for a paced (1x/Nx) replay.
    pub timeline: Option<Timeline>,
}

/// A recording played at a fixed speed: `span` of recorded time takes `span / speed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeline {
    pub span: Duration,
    pub speed: f64,
}

impl Timeline {
    /// Recorded time covered after `elapsed` of replay.
    pub fn played(&self, elapsed: Duration) -> Duration {
        Duration::try_from_secs_f64(elapsed.as_secs_f64() * self.speed)
            .map_or(self.span, |d| d.min(self.span))
    }

    /// Wall time until the last recorded batch is due.
    pub fn remaining(&self, elapsed: Duration) -> Duration {
        let left = (self.span - self.played(elapsed)).as_secs_f64() / self.speed;
        Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX)
    }
}

/// Events/s over a sliding window of `(elapsed, acked)` samples.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: Duration,
    samples: std::collections::VecDeque<(Duration, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: std::collections::VecDeque::from([(Duration::ZERO, 0)]),
        }
    }

    pub fn push(&mut self, at: Duration, count: u64) {
        self.samples.push_back((at, count));
        // Keep one sample at or before the window start so the rate spans the window.
        while self.samples.len() > 2 && at.saturating_sub(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    pub fn per_sec(&self) -> f64 {
        let (Some(&(t0, c0)), Some(&(t1, c1))) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let dt = t1.saturating_sub(t0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            c1.saturating_sub(c0) as f64 / dt
        }
    }
}

/// Everything one progress update shows, derived from a reading.
#[derive(Debug, Clone, PartialEq)]
pub struct View<'a> {
    pub shape: &'a RunShape,
    pub elapsed: Duration,
    pub counts: Counts,
    pub per_sec: f64,
}

impl View<'_> {
    /// Time left: until the recording's last batch is due on a paced replay, else (or
    /// once it is due) the events still unanswered at the current rate; `None` when
    /// nothing is moving.
    pub fn eta(&self) -> Option<Duration> {
        if let Some(t) = self.shape.timeline {
            let left = t.remaining(self.elapsed);
            if !left.is_zero() {
                return Some(left);
            }
        }
        let left = self.shape.total_events.saturating_sub(self.counts.acked());
        if left == 0 {
            Some(Duration::ZERO)
        } else if self.per_sec > 0.0 {
            Duration::try_from_secs_f64(left as f64 / self.per_sec).ok()
        } else {
            None
        }
    }

    /// The text beside the bars: rate, rejects, reconnects, connections, ETA.
    pub fn bar_message(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "{:.0} events/s, {} rejected, {} reconnects",
            self.per_sec, c.rejected, c.reconnects
        );
        if let Some(devices) = self.shape.devices {
            let _ = write!(s, ", {}/{devices} connected", c.connected);
            if c.connect_failed > 0 {
                let _ = write!(s, " ({} failed)", c.connect_failed);
            }
        }
        let _ = write!(s, ", ETA {}", eta_text(self.eta()));
        s
    }

    /// One plain progress line, for logs.
    pub fn line(&self) -> String {
        let c = &self.counts;
        let total = self.shape.total_events;
        let pct = if total == 0 {
            100.0
        } else {
            c.acked() as f64 * 100.0 / total as f64
        };
        let mut s = format!(
            "{}: {:.0} s, {} batches, {}/{total} events acked ({pct:.1}%), {}",
            self.shape.label,
            self.elapsed.as_secs_f64(),
            c.batches,
            c.acked(),
            self.bar_message()
        );
        if let Some(t) = self.shape.timeline {
            let _ = write!(s, ", recording {}", recording_text(&t, self.elapsed));
        }
        s
    }
}

/// Recorded time played, e.g. `1m 20s of 10m (8x)`.
pub fn recording_text(t: &Timeline, elapsed: Duration) -> String {
    format!(
        "{} of {} ({}x)",
        whole_secs(t.played(elapsed)),
        whole_secs(t.span),
        t.speed
    )
}

fn eta_text(eta: Option<Duration>) -> String {
    eta.map_or_else(|| "?".to_owned(), whole_secs)
}

fn whole_secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs_f64().round() as u64)).to_string()
}

/// The indicatif side: an events bar and, on a paced replay, a recording-time bar.
struct Bars {
    _multi: MultiProgress,
    events: ProgressBar,
    recording: Option<ProgressBar>,
}

impl Bars {
    fn new(shape: &RunShape) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = |t: &str| {
            ProgressStyle::with_template(t)
                .expect("constant template")
                .progress_chars("=> ")
        };
        let events = multi.add(
            ProgressBar::new(shape.total_events)
                .with_style(style(
                    "{prefix:9} [{elapsed_precise}] [{bar:40}] {pos}/{len} events\n{prefix:9} {msg}",
                ))
                .with_prefix(shape.label),
        );
        let recording = shape.timeline.map(|t| {
            multi.add(
                ProgressBar::new(t.span.as_millis() as u64)
                    .with_style(style("{prefix:9}            [{bar:40}] {msg}"))
                    .with_prefix("recording"),
            )
        });
        Bars {
            _multi: multi,
            events,
            recording,
        }
    }

    fn draw(&self, view: &View<'_>) {
        self.events.set_position(view.counts.acked());
        self.events.set_message(view.bar_message());
        if let (Some(bar), Some(t)) = (&self.recording, view.shape.timeline) {
            bar.set_position(t.played(view.elapsed).as_millis() as u64);
            bar.set_message(recording_text(&t, view.elapsed));
        }
    }

    fn finish(&self) {
        self.events.finish();
        if let Some(bar) = &self.recording {
            bar.finish();
        }
    }
}

/// The reporter task of one run; `finish` draws the final state and stops it.
pub struct Reporter {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting `counters` against `shape`, timing from `started`.
    pub fn start(
        mode: ProgressMode,
        shape: RunShape,
        counters: Arc<RunCounters>,
        started: Instant,
    ) -> Self {
        let (period, window) = match mode {
            ProgressMode::Off => {
                return Reporter {
                    stop: None,
                    task: None,
                }
            }
            ProgressMode::Lines { every } => (every, every),
            ProgressMode::Bars => (BAR_REFRESH, BAR_RATE_WINDOW),
        };
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let bars = (mode == ProgressMode::Bars).then(|| Bars::new(&shape));
            let mut tick = tokio::time::interval_at((started + period).into(), period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut rate = RateWindow::new(window);
            loop {
                let last = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                let elapsed = started.elapsed();
                let counts = counters.sample();
                rate.push(elapsed, counts.acked());
                let view = View {
                    shape: &shape,
                    elapsed,
                    counts,
                    per_sec: rate.per_sec(),
                };
                match &bars {
                    Some(b) => b.draw(&view),
                    // Plain mode keeps the report on stdout as the only final word.
                    None if !last => eprintln!("{}", view.line()),
                    None => {}
                }
                if last {
                    if let Some(b) = &bars {
                        b.finish();
                    }
                    break;
                }
            }
        });
        Reporter {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Draws the final state (bars only) and waits for the reporter to end.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(timeline: Option<Timeline>, devices: Option<u64>) -> RunShape {
        RunShape {
            label: "replay",
            total_events: 20_000,
            devices,
            timeline,
        }
    }

    #[test]
    fn mode_follows_flags_and_terminal() {
        let five = Duration::from_secs(5);
        assert_eq!(
            ProgressMode::choose(Duration::ZERO, false, true),
            ProgressMode::Off
        );
        assert_eq!(ProgressMode::choose(five, true, true), ProgressMode::Off);
        assert_eq!(ProgressMode::choose(five, true, false), ProgressMode::Off);
        assert_eq!(ProgressMode::choose(five, false, true), ProgressMode::Bars);
        assert_eq!(
            ProgressMode::choose(five, false, false),
            ProgressMode::Lines { every: five }
        );
    }

    #[test]
    fn publish_adds_only_what_changed_since_last_publish() {
        let counters = RunCounters::default();
        let mut reported = Tally::default();
        let mut out = DeviceOutcome {
            batches: 1,
            accepted: 50,
            ..Default::default()
        };
        counters.publish(&mut reported, &out);
        out.batches = 3;
        out.accepted = 140;
        out.rejected.insert("stale".into(), 8);
        out.rejected.insert("not_sent".into(), 2);
        out.reconnects = 1;
        counters.publish(&mut reported, &out);
        counters.publish(&mut reported, &out);
        let c = counters.sample();
        assert_eq!(
            (c.batches, c.accepted, c.rejected, c.reconnects, c.acked()),
            (3, 140, 10, 1, 150)
        );
    }

    #[test]
    fn rate_spans_the_window_and_forgets_older_samples() {
        let s = Duration::from_secs;
        let mut r = RateWindow::new(s(3));
        assert_eq!(r.per_sec(), 0.0);
        r.push(s(1), 1_000);
        assert_eq!(r.per_sec(), 1_000.0);
        r.push(s(2), 2_000);
        r.push(s(3), 5_000);
        r.push(s(4), 8_000);
        // Window is (1 s, 4 s]: 7,000 events in 3 s.
        assert!(
            (r.per_sec() - 7_000.0 / 3.0).abs() < 1e-9,
            "{}",
            r.per_sec()
        );
        r.push(s(10), 8_000);
        assert_eq!(r.per_sec(), 0.0, "stalled for longer than the window");
    }

    #[test]
    fn eta_follows_the_recording_then_the_rate() {
        let timeline = Timeline {
            span: Duration::from_secs(600),
            speed: 8.0,
        };
        let sh = shape(Some(timeline), None);
        let mut v = View {
            shape: &sh,
            elapsed: Duration::from_secs(10),
            counts: Counts {
                accepted: 1_000,
                ..Default::default()
            },
            per_sec: 100.0,
        };
        // 80 s of 600 s played at 8x: 65 s of wall time left.
        assert_eq!(v.eta(), Some(Duration::from_secs(65)));
        v.elapsed = Duration::from_secs(80);
        v.counts.accepted = 19_000;
        assert_eq!(
            v.eta(),
            Some(Duration::from_secs(10)),
            "lagging behind schedule"
        );
        v.per_sec = 0.0;
        assert_eq!(v.eta(), None);
        v.counts.rejected = 1_000;
        assert_eq!(v.eta(), Some(Duration::ZERO));
    }

    #[test]
    fn line_and_bar_message_carry_counts_rate_and_eta() {
        let timeline = Timeline {
            span: Duration::from_secs(600),
            speed: 8.0,
        };
        let sh = shape(Some(timeline), None);
        let v = View {
            shape: &sh,
            elapsed: Duration::from_secs(10),
            counts: Counts {
                batches: 340,
                accepted: 16_997,
                rejected: 3,
                reconnects: 1,
                ..Default::default()
            },
            per_sec: 1_416.6,
        };
        assert_eq!(
            v.bar_message(),
            "1417 events/s, 3 rejected, 1 reconnects, ETA 1m 5s"
        );
        assert_eq!(
            v.line(),
            "replay: 10 s, 340 batches, 17000/20000 events acked (85.0%), \
             1417 events/s, 3 rejected, 1 reconnects, ETA 1m 5s, recording 1m 20s of 10m (8x)"
        );
    }

    #[test]
    fn fleet_message_shows_connections() {
        let mut sh = shape(None, Some(300));
        sh.label = "fleet";
        let v = View {
            shape: &sh,
            elapsed: Duration::from_secs(2),
            counts: Counts {
                accepted: 2_000,
                connected: 198,
                connect_failed: 2,
                ..Default::default()
            },
            per_sec: 0.0,
        };
        assert_eq!(
            v.bar_message(),
            "0 events/s, 0 rejected, 0 reconnects, 198/300 connected (2 failed), ETA ?"
        );
    }
}
