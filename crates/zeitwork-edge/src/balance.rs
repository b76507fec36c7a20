//! Picking an instance: power of two random choices by outstanding requests,
//! skipping instances that recently refused connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use zeitwork_api_types::RouteInstance;

/// How long an instance that refused a connection is left out.
pub const EJECT_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct InstanceStats {
    outstanding: AtomicU32,
    /// Milliseconds since the balancer started; 0 = healthy.
    ejected_until: AtomicU64,
}

#[derive(Debug)]
pub struct Balancer {
    start: Instant,
    stats: RwLock<HashMap<String, Arc<InstanceStats>>>,
}

/// Decrements the outstanding count when the request is done.
#[derive(Debug)]
pub struct InFlight(Arc<InstanceStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self { start: Instant::now(), stats: RwLock::new(HashMap::new()) }
    }
}

impl Balancer {
    fn stats(&self, id: &str) -> Arc<InstanceStats> {
        if let Some(s) = self.stats.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return s.clone();
        }
        let mut m = self.stats.write().unwrap_or_else(|e| e.into_inner());
        m.entry(id.to_owned()).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Chooses among `instances` not in `tried`; healthy ones first.
    pub fn pick<'a>(&self, instances: &'a [RouteInstance], tried: &[String]) -> Option<(&'a RouteInstance, InFlight)> {
        let now = self.now_ms();
        let candidates: Vec<(&RouteInstance, Arc<InstanceStats>)> =
            instances.iter().filter(|i| !tried.contains(&i.id)).map(|i| (i, self.stats(&i.id))).collect();
        let healthy: Vec<&(&RouteInstance, Arc<InstanceStats>)> =
            candidates.iter().filter(|(_, s)| s.ejected_until.load(Ordering::Relaxed) <= now).collect();
        let pool: Vec<&(&RouteInstance, Arc<InstanceStats>)> =
            if healthy.is_empty() { candidates.iter().collect() } else { healthy };
        let chosen = match pool.len() {
            0 => return None,
            1 => pool[0],
            n => {
                let mut rng = rand::thread_rng();
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |i: usize| pool[i].1.outstanding.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    pool[b]
                } else {
                    pool[a]
                }
            }
        };
        chosen.1.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((chosen.0, InFlight(chosen.1.clone())))
    }

    /// Leaves an instance out for [`EJECT_FOR`] after it refused a connection.
    pub fn eject(&self, id: &str) {
        let until = self.now_ms() + EJECT_FOR.as_millis() as u64;
        self.stats(id).ejected_until.store(until, Ordering::Relaxed);
    }

    /// Puts an instance back after it answered.
    pub fn restore(&self, id: &str) {
        self.stats(id).ejected_until.store(0, Ordering::Relaxed);
    }

    /// Drops counters of instances no longer routed.
    pub fn retain(&self, live: &std::collections::HashSet<String>) {
        let mut m = self.stats.write().unwrap_or_else(|e| e.into_inner());
        m.retain(|id, s| live.contains(id) || s.outstanding.load(Ordering::Relaxed) > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str) -> RouteInstance {
        RouteInstance { id: id.into(), upstream: format!("http://{id}") }
    }

    #[test]
    fn prefers_less_loaded_and_skips_ejected() {
        let b = Balancer::default();
        let list = vec![inst("a"), inst("b")];
        // Hold 5 requests on "a": with two choices, "b" always wins.
        let held: Vec<_> = (0..5).map(|_| b.pick(&list[..1], &[]).unwrap().1).collect();
        for _ in 0..20 {
            assert_eq!(b.pick(&list, &[]).unwrap().0.id, "b");
        }
        drop(held);
        b.eject("b");
        for _ in 0..20 {
            assert_eq!(b.pick(&list, &[]).unwrap().0.id, "a");
        }
        assert_eq!(b.pick(&list, &["a".into()]).unwrap().0.id, "b", "an ejected instance still beats none");
        assert!(b.pick(&list, &["a".into(), "b".into()]).is_none());
        b.restore("b");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.insert(b.pick(&list, &[]).unwrap().0.id.clone());
        }
        assert_eq!(seen.len(), 2);
    }
}
