use super::engine::GRANTED;
use super::host::read_assets;
use super::limits::{CpuMeter, Next, TICK, YIELD_TICKS};
use super::*;
use std::time::{Duration, Instant};

#[test]
fn the_cpu_budget_counts_the_guest_running_not_waiting() {
    let allot = TICK * YIELD_TICKS as u32;
    let budget = Duration::from_millis(20);
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // A guest that runs without pause is charged every check in full and stopped.
    let mut m = CpuMeter::new(t0);
    assert_eq!(m.check(ms(5), Duration::ZERO, allot, budget), Next::Yield);
    assert_eq!(m.check(ms(10), Duration::ZERO, allot, budget), Next::Yield);
    assert_eq!(m.check(ms(15), Duration::ZERO, allot, budget), Next::Yield);
    assert_eq!(
        m.check(ms(20), Duration::ZERO, allot, budget),
        Next::Interrupt
    );
    // One that waited 300 ms for a core after a yield is charged its allotment at
    // most, and runs before it yields again.
    let mut m = CpuMeter::new(t0);
    assert_eq!(m.check(ms(5), Duration::ZERO, allot, budget), Next::Yield);
    assert_eq!(m.check(ms(305), Duration::ZERO, allot, budget), Next::Run);
    assert_eq!(m.guest, Duration::from_millis(10));
    // Time in host calls (compute waiting for its forward) is not the guest's.
    let mut m = CpuMeter::new(t0);
    let next = m.check(ms(1003), Duration::from_millis(1000), allot, budget);
    assert_eq!((next, m.guest), (Next::Yield, Duration::from_millis(3)));
}

#[test]
fn the_plugin_memory_pool_refuses_past_its_cap_and_takes_releases() {
    let pool = MemoryPool::new(100);
    assert!(pool.try_charge(60));
    assert!(!pool.try_charge(41), "over the cap");
    assert_eq!(pool.used(), 60, "a refusal charges nothing");
    assert!(pool.try_charge(40));
    pool.release(60);
    assert!(pool.try_charge(60));
}

#[test]
fn assets_are_read_once_keyed_from_the_bundle_root() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("assets/sub")).unwrap();
    std::fs::write(dir.path().join("assets/labels.txt"), "a\nb").unwrap();
    std::fs::write(dir.path().join("assets/sub/vocab.txt"), "x").unwrap();
    std::fs::write(dir.path().join("bundle.toml"), "not an asset").unwrap();
    let assets = read_assets(dir.path()).unwrap();
    let keys: Vec<&str> = assets.keys().map(String::as_str).collect();
    assert_eq!(keys, ["assets/labels.txt", "assets/sub/vocab.txt"]);
    assert_eq!(assets["assets/labels.txt"], b"a\nb");
}

#[test]
fn an_asset_symlink_out_of_the_bundle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("assets")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("assets/evil")).unwrap();
    let err = read_assets(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("asset `assets/evil`") && err.contains("outside"),
        "{err}"
    );
}

#[test]
fn only_granted_interfaces_pass_the_import_check() {
    let granted = |n: &str| GRANTED.iter().any(|g| n.starts_with(g));
    assert!(granted("wasi:io/streams@0.2.6"));
    assert!(granted("wasi:nn/inference@0.2.0-rc-2024-10-28"));
    assert!(granted("nnserve:plugin/host@0.1.0"));
    assert!(!granted("wasi:sockets/tcp@0.2.6"));
    assert!(!granted("wasi:http/outgoing-handler@0.2.6"));
    assert!(!granted("nnserve:plugin/other@0.1.0"));
}
