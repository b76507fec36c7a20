//! `bench/ratelimit`: the edge's rate limiter under a flood of distinct
//! clients (IPv6 /64s, each one new), at its default bound of 100 000
//! buckets. Prints the time per check for each slice of clients and the
//! process's resident memory at the start and the end; then the same for
//! the limiter it replaced (which scanned a full shard for each new client),
//! over fewer clients, since it slows down as the shards fill.
//!
//! cargo run --release -p zeitwork-bench-ratelimit -- [--clients 1000000] [--bound 100000] [--old-clients 200000]

mod old;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use zeitwork_api_types::RateLimit;
use zeitwork_edge::ratelimit::RateLimiter;

/// Strict enough that a bucket is still not full again when the hand comes
/// round: eviction has to choose, not just take refilled buckets.
const LIMIT: RateLimit = RateLimit { requests_per_second: 1, burst: 10 };

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident memory of this process, MiB.
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// The i-th client: a /64 of its own.
fn client(i: usize) -> IpAddr {
    IpAddr::from(((0x2001_0db8u128 << 96) | ((i as u128) << 64) | 1).to_be_bytes())
}

fn run(name: &str, clients: usize, check: impl Fn(IpAddr, Instant) -> bool) {
    let slices = 10;
    let per_slice = (clients / slices).max(1);
    let t0 = Instant::now();
    println!("{name}: {clients} distinct clients, rss at start {:.1} MiB", rss_mib());
    println!("  {:>9}  {:>11}  {:>9}  {:>8}", "clients", "ns/check", "limited", "rss MiB");
    let mut worst = Duration::ZERO;
    for s in 0..slices {
        let start = Instant::now();
        let mut limited = 0;
        for i in s * per_slice..(s + 1) * per_slice {
            // A new client every simulated microsecond.
            let now = t0 + Duration::from_micros(i as u64);
            if !check(client(i), now) {
                limited += 1;
            }
        }
        let took = start.elapsed();
        worst = worst.max(took);
        let ns = took.as_nanos() as f64 / per_slice as f64;
        println!("  {:>9}  {:>11.1}  {:>9}  {:>8.1}", (s + 1) * per_slice, ns, limited, rss_mib());
    }
    println!(
        "  rss at end {:.1} MiB; slowest slice {:.1} ns/check",
        rss_mib(),
        worst.as_nanos() as f64 / per_slice as f64
    );
}

fn main() {
    let clients = flag("--clients", 1_000_000);
    let bound = flag("--bound", 100_000);
    let old_clients = flag("--old-clients", 200_000);
    let limiter = RateLimiter::new(bound);
    run(&format!("CLOCK limiter, bound {bound}"), clients, |ip, now| limiter.check(ip, 0, LIMIT, now).is_ok());
    println!("  buckets held: {}", limiter.len());
    drop(limiter);
    if old_clients > 0 {
        let old = old::RateLimiter::new(bound);
        run(&format!("scanning limiter (before), bound {bound}"), old_clients, |ip, now| {
            old.check(ip, 0, LIMIT, now).is_ok()
        });
    }
}
