//! Measures heap bytes per tracked device in ingest's anti-replay state, active
//! (full window) and dormant (evicted: high-water mark only), with a counting
//! allocator: `cargo run --release -p fleetgate-benches --example device_memory`.

use fleetgate_ingest::identity::{DeviceId, FleetId};
use fleetgate_ingest::replay::ReplayWindows;

#[global_allocator]
static ALLOC: fleetgate_benches::CountingAlloc = fleetgate_benches::CountingAlloc;

fn main() {
    let devices: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let width = 1024;
    let fleet = FleetId::parse("fleet-a").unwrap();
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::parse(&format!("vehicle-{i:08}")).unwrap())
        .collect();
    let before = fleetgate_benches::live_bytes();
    let windows = ReplayWindows::new(width);
    for (i, d) in ids.iter().enumerate() {
        windows.observe_clock(&fleet, d, 0, 1_000);
        windows.with(&fleet, d, |w| {
            for s in 1..=10u64 {
                w.reserve(s + i as u64 % 7);
                w.commit(s + i as u64 % 7);
            }
        });
    }
    let active = fleetgate_benches::live_bytes() - before;
    windows.evict_idle(2_000);
    let dormant = fleetgate_benches::live_bytes() - before;
    println!(
        "devices={devices} window={width}: active {:.0} B/device, dormant {:.0} B/device \
         (heap incl. map overhead; device ids are shared Arc<str> held by the caller too)",
        active as f64 / devices as f64,
        dormant as f64 / devices as f64
    );
}
