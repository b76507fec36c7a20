//! The edge's rate limiter as it was before CLOCK eviction, kept to compare:
//! when a shard is full it scans the whole shard for each new client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeitwork_api_types::RateLimit;

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    shards: Vec<Mutex<HashMap<(u128, u64), Bucket>>>,
    max_per_shard: usize,
}

impl RateLimiter {
    /// `max_clients`: memory bound, in buckets.
    pub fn new(max_clients: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_per_shard: (max_clients / SHARDS).max(1),
        }
    }

    /// Takes one token for `ip` under `limit`, scoped by `scope` (a project's
    /// own limit has buckets of its own). `Err` carries how long to wait.
    pub fn check(&self, ip: IpAddr, scope: u64, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let key = (zeitwork_net::client_key(ip), scope);
        let shard = &self.shards[(key.0 as usize ^ key.1 as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(limit.requests_per_second);
        let burst = f64::from(limit.burst.max(1));
        if !map.contains_key(&key) && map.len() >= self.max_per_shard {
            evict(&mut map, rate, burst, now, self.max_per_shard);
        }
        let b = map.entry(key).or_insert(Bucket { tokens: burst, last: now });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

fn evict(map: &mut HashMap<(u128, u64), Bucket>, rate: f64, burst: f64, now: Instant, max: usize) {
    map.retain(|_, b| b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst);
    while map.len() >= max {
        let oldest = map.iter().min_by_key(|(_, b)| b.last).map(|(k, _)| *k);
        match oldest {
            Some(k) => map.remove(&k),
            None => break,
        };
    }
}
