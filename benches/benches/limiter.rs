//! Cost of the quota check per batch (`Quotas::check` on a 100-event, 12 kB batch,
//! 10 000 devices in 10 fleets cycling), and heap bytes per tracked device, measured
//! with a counting allocator.
//! Run: `cargo bench -p fleetgate-benches --bench limiter`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use fleetgate_ingest::quota::{FakeRelativeClock, QuotaConfig, Quotas, RateSpec};

#[global_allocator]
static ALLOC: fleetgate_benches::CountingAlloc = fleetgate_benches::CountingAlloc;

const EVENTS: u32 = 100;
const BYTES: u32 = 12_000;
const DEVICES: usize = 10_000;
const FLEETS: usize = 10;
/// Simulated time between batches on the fake clock: 100k batches/s = 10M events/s.
const PACE: Duration = Duration::from_micros(10);

fn ids(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("fleet-{}", i % FLEETS), format!("car-{i:06}")))
        .collect()
}

/// Default device limit (each device sends 100 events per 100 ms of simulated time,
/// exactly its 1000/s); fleet and node limits finite and large enough for 10M events/s.
fn paced_config() -> QuotaConfig {
    let d = QuotaConfig::default();
    QuotaConfig {
        fleet: RateSpec {
            events_per_sec: 2_000_000,
            event_burst: 4_000_000,
            bytes_per_sec: 256 << 20,
            byte_burst: 1 << 30,
        },
        global: RateSpec {
            events_per_sec: 20_000_000,
            event_burst: 40_000_000,
            bytes_per_sec: 2 << 30,
            byte_burst: u32::MAX,
        },
        ..d
    }
}

/// Full path: device, fleet and node meters on events and bytes (six GCRA checks).
/// The fake clock is one atomic load per read; the real clock's read is in the next.
fn check_all_scopes(c: &mut Criterion) {
    let clock = FakeRelativeClock::default();
    let quotas = Quotas::with_clock(&paced_config(), clock.clone());
    let ids = ids(DEVICES);
    let (mut i, mut refused) = (0usize, 0u64);
    let mut group = c.benchmark_group("quota");
    group.throughput(Throughput::Elements(u64::from(EVENTS)));
    group.bench_function("check_100_event_batch_10k_devices_all_scopes", |b| {
        b.iter(|| {
            let (fleet, device) = &ids[i % DEVICES];
            i = i.wrapping_add(1);
            clock.advance(PACE);
            refused += u64::from(quotas.check(fleet, device, EVENTS, BYTES).is_err());
        })
    });
    group.finish();
    assert_eq!(refused, 0, "the benchmark must measure admissions");
}

/// Real clock, device meters only (fleet and node unlimited): no real-time limit could
/// admit the benchmark's pace at fleet or node level, so those are left out here.
fn check_device_real_clock(c: &mut Criterion) {
    let cfg = QuotaConfig {
        device: RateSpec {
            events_per_sec: 10_000_000,
            event_burst: u32::MAX,
            bytes_per_sec: u32::MAX,
            byte_burst: u32::MAX,
        },
        fleet: RateSpec::UNLIMITED,
        global: RateSpec::UNLIMITED,
        ..QuotaConfig::default()
    };
    let quotas = Quotas::new(&cfg);
    let ids = ids(DEVICES);
    let (mut i, mut refused) = (0usize, 0u64);
    let mut group = c.benchmark_group("quota");
    group.throughput(Throughput::Elements(u64::from(EVENTS)));
    group.bench_function(
        "check_100_event_batch_10k_devices_device_only_real_clock",
        |b| {
            b.iter(|| {
                let (fleet, device) = &ids[i % DEVICES];
                i = i.wrapping_add(1);
                refused += u64::from(quotas.check(fleet, device, EVENTS, BYTES).is_err());
            })
        },
    );
    group.finish();
    assert_eq!(refused, 0, "the benchmark must measure admissions");
}

/// Heap growth per device with the default configuration (events and bytes limited
/// per device, so two limiter entries per device).
fn memory_per_device() {
    const N: usize = 100_000;
    let ids = ids(N);
    let quotas = Quotas::new(&QuotaConfig::default());
    let before = fleetgate_benches::live_bytes();
    for (fleet, device) in &ids {
        black_box(quotas.check(fleet, device, 1, 100)).ok();
    }
    let after = fleetgate_benches::live_bytes();
    assert_eq!(quotas.tracked_devices(), N);
    println!(
        "quota/memory: {N} tracked devices, {} heap bytes, {:.1} bytes per device",
        after - before,
        (after - before) as f64 / N as f64
    );
}

criterion_group!(benches, check_all_scopes, check_device_real_clock);

fn main() {
    memory_per_device();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
