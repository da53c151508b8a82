//! Maintenance jobs inside `imgsrv serve`: each on its own thread, first a
//! short while after the start, then every interval, until the server stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stops the jobs started with it (after their current run).
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// Sleeps `d`, or less if stopped; `false` when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let wake = Instant::now() + d;
        while Instant::now() < wake {
            if self.stopped() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250).min(wake - Instant::now()));
        }
        !self.stopped()
    }
}

/// Runs `job` `first` after now, then every `interval`, on a thread named
/// `name`, until `stop`.
pub fn spawn(
    name: &str,
    first: Duration,
    interval: Duration,
    stop: &Stop,
    mut job: impl FnMut() + Send + 'static,
) {
    let stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if !stop.sleep(first) {
                return;
            }
            loop {
                job();
                if !stop.sleep(interval) {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("{name}: cannot start a thread: {e}");
    }
}
