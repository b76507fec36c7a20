//! Picking an instance: power of two random choices by outstanding requests,
//! skipping instances that recently refused connections.
//!
//! Outstanding requests are counted per worker thread, each worker balancing
//! its own requests (as per-worker balancers in other proxies do): the
//! counters are touched on every request and are never shared between cores.
//! Ejections are shared by all workers; they are written rarely and read on
//! every pick.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use zeitwork_api_types::RouteInstance;

/// How long an instance that refused a connection is left out.
pub const EJECT_FOR: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Balancer {
    start: Instant,
    /// Milliseconds since `start` until which an instance is left out; 0 = healthy.
    ejected: RwLock<HashMap<String, Arc<AtomicU64>>>,
    /// Bumped when `ejected` loses entries, so threads drop their copies.
    generation: AtomicU64,
}

/// One worker thread's view: its own outstanding counts and its handles on
/// the shared ejections.
#[derive(Default)]
struct Local {
    balancer: usize,
    generation: u64,
    instances: HashMap<String, (Arc<AtomicU32>, Arc<AtomicU64>)>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

/// Decrements the outstanding count when the request is done.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self { start: Instant::now(), ejected: RwLock::new(HashMap::new()), generation: AtomicU64::new(0) }
    }
}

impl Balancer {
    fn ejection(&self, id: &str) -> Arc<AtomicU64> {
        if let Some(e) = self.ejected.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return e.clone();
        }
        let mut m = self.ejected.write().unwrap_or_else(|e| e.into_inner());
        m.entry(id.to_owned()).or_default().clone()
    }

    /// This thread's counters and ejection handle of each instance, in order.
    fn handles(&self, instances: &[RouteInstance]) -> Vec<(Arc<AtomicU32>, Arc<AtomicU64>)> {
        let me = self as *const Balancer as usize;
        let generation = self.generation.load(Ordering::Acquire);
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if local.balancer != me || local.generation != generation {
                // Counters of requests still running live on in their InFlight guards.
                *local = Local { balancer: me, generation, instances: HashMap::new() };
            }
            instances
                .iter()
                .map(|i| {
                    if let Some(h) = local.instances.get(&i.id) {
                        return h.clone();
                    }
                    let h = (Arc::new(AtomicU32::new(0)), self.ejection(&i.id));
                    local.instances.insert(i.id.clone(), h.clone());
                    h
                })
                .collect()
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Chooses among `instances` not in `tried`; healthy ones first.
    pub fn pick<'a>(&self, instances: &'a [RouteInstance], tried: &[String]) -> Option<(&'a RouteInstance, InFlight)> {
        let handles = self.handles(instances);
        let now = self.now_ms();
        let candidates: Vec<usize> = (0..instances.len()).filter(|&i| !tried.contains(&instances[i].id)).collect();
        let healthy: Vec<usize> =
            candidates.iter().copied().filter(|&i| handles[i].1.load(Ordering::Relaxed) <= now).collect();
        let pool = if healthy.is_empty() { candidates } else { healthy };
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
                let load = |i: usize| handles[pool[i]].0.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    pool[b]
                } else {
                    pool[a]
                }
            }
        };
        let counter = handles[chosen].0.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        Some((&instances[chosen], InFlight(counter)))
    }

    /// Leaves an instance out for [`EJECT_FOR`] after it refused a connection.
    pub fn eject(&self, id: &str) {
        let until = self.now_ms() + EJECT_FOR.as_millis() as u64;
        self.ejection(id).store(until, Ordering::Relaxed);
    }

    /// Puts an instance back after it answered. Healthy instances are only
    /// read, so the workers do not fight over the cache line.
    pub fn restore(&self, id: &str) {
        let me = self as *const Balancer as usize;
        let known = LOCAL.with(|l| {
            let l = l.borrow();
            (l.balancer == me).then(|| l.instances.get(id).map(|(_, e)| e.clone())).flatten()
        });
        let e = known.unwrap_or_else(|| self.ejection(id));
        if e.load(Ordering::Relaxed) != 0 {
            e.store(0, Ordering::Relaxed);
        }
    }

    /// Drops the state of instances no longer routed.
    pub fn retain(&self, live: &std::collections::HashSet<String>) {
        let mut m = self.ejected.write().unwrap_or_else(|e| e.into_inner());
        let before = m.len();
        m.retain(|id, _| live.contains(id));
        if m.len() != before {
            self.generation.fetch_add(1, Ordering::Release);
        }
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
