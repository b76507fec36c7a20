//! Per-client token buckets with bounded memory: IPv4 addresses and IPv6 /64s
//! are the keys, scoped by project where a project has a limit of its own.
//!
//! Each shard holds a fixed number of slots and reuses them in CLOCK order:
//! a bucket that has refilled under its own limit (an idle client, nothing
//! lost by forgetting it) goes first, then one not used since the hand last
//! passed. The hand looks at a bounded number of slots, so taking a slot
//! for a new client costs the same at 1 000 clients as at 1 000 000 (a scan
//! per new client would let cheap IPv6 /64s stall the edge).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeitwork_api_types::RateLimit;

const SHARDS: usize = 16;
/// Most slots the hand looks at for one new client.
const CLOCK_STEPS: usize = 8;

/// A client under a scope (0: the edge's default limit, else a project's).
type Key = (u128, u64);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    key: Key,
    tokens: f64,
    /// Nanoseconds since the limiter's epoch.
    last: u64,
    /// When the bucket is full again under its own limit.
    full_at: u64,
    /// Used since the hand last passed.
    recent: bool,
}

#[derive(Debug, Default)]
struct Shard {
    index: HashMap<Key, u32>,
    slots: Vec<Bucket>,
    hand: usize,
}

impl Shard {
    /// The slot for a client not seen (or forgotten), reusing one when full.
    fn slot_for(&mut self, key: Key, capacity: usize, now: u64, burst: f64) -> usize {
        let fresh = Bucket { key, tokens: burst, last: now, full_at: now, recent: false };
        if self.slots.len() < capacity {
            self.slots.push(fresh);
            self.index.insert(key, (self.slots.len() - 1) as u32);
            return self.slots.len() - 1;
        }
        let len = self.slots.len();
        let mut victim = self.hand;
        for _ in 0..CLOCK_STEPS {
            victim = self.hand;
            self.hand = (self.hand + 1) % len;
            let s = &mut self.slots[victim];
            if s.full_at <= now || !s.recent {
                break;
            }
            s.recent = false;
        }
        self.index.remove(&self.slots[victim].key);
        self.slots[victim] = fresh;
        self.index.insert(key, victim as u32);
        victim
    }
}

#[derive(Debug)]
pub struct RateLimiter {
    shards: Vec<Mutex<Shard>>,
    max_per_shard: usize,
    epoch: Instant,
}

impl RateLimiter {
    /// `max_clients`: memory bound, in buckets.
    pub fn new(max_clients: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_per_shard: (max_clients / SHARDS).clamp(1, u32::MAX as usize),
            epoch: Instant::now(),
        }
    }

    /// Takes one token for `ip` under `limit`, scoped by `scope` (a project's
    /// own limit has buckets of its own). `Err` carries how long to wait.
    pub fn check(&self, ip: IpAddr, scope: u64, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let key = (zeitwork_net::client_key(ip), scope);
        let shard = &self.shards[shard_of(key)];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(limit.requests_per_second.max(1));
        let burst = f64::from(limit.burst.max(1));
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let i = match shard.index.get(&key) {
            Some(&i) => i as usize,
            None => shard.slot_for(key, self.max_per_shard, now, burst),
        };
        let b = &mut shard.slots[i];
        let elapsed = now.saturating_sub(b.last) as f64 / 1e9;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        b.recent = true;
        let taken = b.tokens >= 1.0;
        if taken {
            b.tokens -= 1.0;
        }
        b.full_at = now.saturating_add(((burst - b.tokens) / rate * 1e9) as u64);
        if taken {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).index.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn shard_of((client, scope): Key) -> usize {
    // Mix the bits: IPv6 keys differ only in their upper half, IPv4 ones in the lower.
    let h = (client as u64) ^ ((client >> 64) as u64) ^ scope.rotate_left(17);
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: RateLimit = RateLimit { requests_per_second: 10, burst: 5 };

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(1000);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            rl.check(ip, 0, LIMIT, t0).unwrap();
        }
        let wait = rl.check(ip, 0, LIMIT, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Another client is not affected.
        rl.check("127.0.0.3".parse().unwrap(), 0, LIMIT, t0).unwrap();
        // A project scope has its own bucket.
        rl.check(ip, 7, LIMIT, t0).unwrap();
        // 100 ms later one token is back.
        rl.check(ip, 0, LIMIT, t0 + Duration::from_millis(100)).unwrap();
        assert!(rl.check(ip, 0, LIMIT, t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn memory_stays_bounded() {
        let rl = RateLimiter::new(160);
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = rl.check(ip, 0, LIMIT, t0);
        }
        assert!(rl.len() <= 160, "{}", rl.len());
        for s in &rl.shards {
            let s = s.lock().unwrap();
            assert_eq!(s.index.len(), s.slots.len(), "every slot is indexed once");
            assert!(s.index.iter().all(|(k, &i)| s.slots[i as usize].key == *k));
        }
    }

    #[test]
    fn ipv6_clients_spread_over_the_shards() {
        let rl = RateLimiter::new(SHARDS * 1000);
        let t0 = Instant::now();
        for i in 0..4000u128 {
            let ip = IpAddr::from(((0x2001_0db8u128 << 96) | (i << 64)).to_be_bytes());
            rl.check(ip, 0, LIMIT, t0).unwrap();
        }
        let used = rl.shards.iter().filter(|s| !s.lock().unwrap().index.is_empty()).count();
        assert_eq!(used, SHARDS);
    }

    /// A client that keeps sending keeps its (empty) bucket while a flood of
    /// new clients passes through the same shard: it does not get a fresh
    /// burst by being pushed out.
    #[test]
    fn a_busy_client_outlives_a_flood_of_new_ones() {
        let rl = RateLimiter::new(SHARDS * 64);
        let t0 = Instant::now();
        let busy: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..5 {
            rl.check(busy, 0, LIMIT, t0).unwrap();
        }
        for i in 0..200_000u32 {
            let _ = rl.check(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), 0, LIMIT, t0);
            if i % 16 == 0 {
                assert!(rl.check(busy, 0, LIMIT, t0).is_err(), "the busy client was forgotten after {i} new clients");
            }
        }
    }

    /// Clients whose key falls in the same shard as `key`'s.
    fn neighbours(key: Key, scope: u64) -> impl Iterator<Item = IpAddr> {
        (0..u32::MAX)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .filter(move |ip| shard_of((zeitwork_net::client_key(*ip), scope)) == shard_of(key))
    }

    /// Whether a bucket may be forgotten is judged by its own limit, not by
    /// the limit of the client that needs the slot: a strict project's
    /// bucket emptied a moment ago is not "refilled" because a generous
    /// project's client would have refilled by now.
    #[test]
    fn buckets_are_judged_by_their_own_limit() {
        let strict = RateLimit { requests_per_second: 1, burst: 1 };
        let generous = RateLimit { requests_per_second: 1000, burst: 5 };
        let rl = RateLimiter::new(SHARDS * 2);
        let t0 = Instant::now();
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        let key = (zeitwork_net::client_key(client), 1);
        let mut others = neighbours(key, 2);
        let (idle, newcomer) = (others.next().unwrap(), others.next().unwrap());
        rl.check(client, 1, strict, t0).unwrap();
        rl.check(idle, 2, generous, t0).unwrap();
        // 10 ms later the generous bucket is full again, the strict one is not.
        let later = t0 + Duration::from_millis(10);
        rl.check(newcomer, 2, generous, later).unwrap();
        assert!(rl.check(client, 1, strict, later).is_err(), "the strict bucket was forgotten");
    }
}
