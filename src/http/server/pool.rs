//! The request workers: threads started on demand, up to
//! [`super::ServerConfig::max_workers`], each serving connections that have a complete
//! request head. Connections beyond that wait in a queue (they cost no thread while
//! they wait). A worker idle for [`IDLE_EXIT`] ends, so a burst leaves no threads behind.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::Parked;

/// How long a worker waits for work before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(30);

/// Serves one connection; runs on a worker thread.
pub(super) type Work = Arc<dyn Fn(Parked, &mut Vec<u8>) + Send + Sync>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Parked>,
    threads: usize,
    idle: usize,
    busy: usize,
    closing: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a job is queued or the pool closes.
    work: Condvar,
    /// Signalled when a worker finishes a job or ends.
    done: Condvar,
    max: usize,
    run: Work,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
pub(super) struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(max: usize, run: Work) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                done: Condvar::new(),
                max: max.max(1),
                run,
            }),
        }
    }

    /// Queues `job`; wakes an idle worker or starts one if the limit allows.
    pub fn submit(&self, job: Parked) {
        let mut st = self.inner.lock();
        st.jobs.push_back(job);
        // An idle worker for every queued job (a notified one counts as idle until it
        // pops its job): wake one. Otherwise start another, so a job never waits behind
        // a busy worker while the limit allows one more.
        if st.idle >= st.jobs.len() {
            self.inner.work.notify_one();
            return;
        }
        if st.threads >= self.inner.max {
            return;
        }
        st.threads += 1;
        drop(st);
        let inner = self.inner.clone();
        let spawned = thread::Builder::new()
            .name("imgsrv-worker".into())
            .spawn(move || worker(&inner));
        if let Err(e) = spawned {
            log::error!("cannot start a request worker: {e}");
            let mut st = self.inner.lock();
            st.threads -= 1;
            if st.threads == 0 {
                // Nobody would ever take these: drop them (closing their connections).
                let n = st.jobs.len();
                st.jobs.clear();
                log::error!("no request worker: closed {n} waiting connection(s)");
            }
        }
    }

    /// Lets the workers finish what is queued and in progress, then end; waits until
    /// `deadline` at most. Returns the number of jobs still running or queued.
    pub fn close(&self, deadline: Instant) -> usize {
        let mut st = self.inner.lock();
        st.closing = true;
        self.inner.work.notify_all();
        while st.busy + st.jobs.len() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .inner
                .done
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.busy + st.jobs.len()
    }
}

fn worker(inner: &Inner) {
    // The one streaming buffer of this thread, reused by every response it writes.
    let mut scratch = Vec::new();
    let mut st = inner.lock();
    loop {
        if let Some(job) = st.jobs.pop_front() {
            st.busy += 1;
            drop(st);
            let r = panic::catch_unwind(AssertUnwindSafe(|| (inner.run)(job, &mut scratch)));
            if r.is_err() {
                log::error!("request worker panicked; its connection was closed");
                scratch = Vec::new();
            }
            st = inner.lock();
            st.busy -= 1;
            inner.done.notify_all();
            continue;
        }
        if st.closing {
            break;
        }
        st.idle += 1;
        let (guard, timeout) = inner
            .work
            .wait_timeout(st, IDLE_EXIT)
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out() && st.jobs.is_empty() {
            break;
        }
    }
    st.threads -= 1;
    inner.done.notify_all();
}
