//! Threads of the operator's own for its work in the background: the
//! deployment engine, the routing table's upkeep, the watches and feeds, the
//! notifier and the probes.
//!
//! That work reads the store whole now and then (the routing table's safety
//! net, the engine's sweep: hundreds of thousands of rows at large scale) and
//! decodes and compares what it read in long stretches without yielding. On
//! the threads that answer the API, every call arriving meanwhile would wait
//! for the stretch to end; on threads of their own the system's scheduler
//! shares the cores between both, and calls are answered within a time slice.
//! The background threads also ask for less CPU time (a higher nice value),
//! so that when the cores are busy the calls' threads run first: background
//! work is measured in hundreds of milliseconds, a call in a few.
//!
//! One set of threads serves every operator of the process; it lives as long
//! as the process.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// Two: the engine and the routing table's whole reads may run at once.
const THREADS: usize = 2;

fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(THREADS)
                .thread_name("zeitwork-background")
                .on_thread_start(lower_priority)
                .enable_all()
                .build()
            {
                Ok(rt) => Some(rt),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the background threads; background work shares the API's");
                    None
                }
            }
        })
        .as_ref()
}

/// How much less CPU time the background threads ask for than the API's
/// (added to the nice value: 10 more gets a thread about a tenth of a
/// contended core).
const NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority, so that when the cores
/// are busy the system runs the threads that answer calls first.
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(tid), (now + NICENESS).min(19)) {
        tracing::debug!(error = %e, "cannot lower the background threads' priority");
    }
}

/// Runs `task` on the background threads (on the caller's runtime if they
/// could not be started). The task is aborted when the returned handle is
/// dropped: it never outlives what started it, as a task of the caller's
/// runtime would not outlive that runtime.
pub fn spawn<F>(task: F) -> Task<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Task(match runtime() {
        Some(rt) => rt.spawn(task),
        None => tokio::spawn(task),
    })
}

/// A task on the background threads; awaiting it gives its output, dropping
/// it aborts it.
#[derive(Debug)]
pub struct Task<T>(JoinHandle<T>);

impl<T> Future for Task<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    /// Whether the caller runs on the background threads.
    fn here() -> bool {
        super::runtime()
            .is_some_and(|rt| tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == rt.handle().id()))
    }

    #[tokio::test]
    async fn background_work_runs_on_threads_apart() {
        assert!(!here(), "a test's own runtime is not the background one");
        let there = super::spawn(async { here() }).await.unwrap();
        assert!(there, "a spawned task runs on the background threads");
    }

    #[tokio::test]
    async fn background_threads_yield_to_the_others() {
        let own = rustix::process::getpriority_process(None).unwrap();
        let there = super::spawn(async { rustix::process::getpriority_process(Some(rustix::thread::gettid())) })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(there, (own + super::NICENESS).min(19), "the background threads run at a lower priority");
    }

    #[tokio::test]
    async fn a_dropped_task_is_aborted() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = super::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(task);
        // The sender goes with the aborted task.
        assert!(rx.await.is_err(), "the task was aborted");
    }
}
