//! Deadlines kept by one thread for the whole process.
//!
//! Every connection's driver has a deadline: the next heartbeat to send,
//! the peer's silence limit, the handshake's end, a closing link's grace.
//! Kept in the arbiter's own tokio timer, one armed timer made every park
//! of that thread (twice per round trip, on a busy connection) read the
//! clock once more and scan the timer wheel: about 190 instructions a
//! park, paid by every task on the arbiter, not only Courier's. Here a
//! deadline is an entry in a table one thread watches; that thread sleeps
//! until the earliest entry is due and wakes its task. A deadline moves
//! rarely (a driver lets its timer fire early rather than move it with
//! every frame), so the table's lock is taken about once per heartbeat
//! interval per connection, and the thread is woken early only when a
//! deadline is set sooner than the one it waits for. Should the thread
//! fail to start, deadlines wait in tokio's timer until it does.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tracing::error;

/// The table and the thread's wake-up.
struct Timers {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Tasks to wake, by deadline, then by a number unique to the entry.
    waiting: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// Whether the thread runs.
    started: bool,
    /// Whether a failure to start it was logged (once is enough).
    start_failed: bool,
    /// What the thread sleeps until: `None` while it waits for any entry
    /// (or is not started).
    sleeps_until: Option<Instant>,
}

fn timers() -> &'static Timers {
    static TIMERS: OnceLock<Timers> = OnceLock::new();
    TIMERS.get_or_init(|| Timers {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    })
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs under the lock, but a poisoned
        // table is still a table.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread: wakes every task whose deadline passed, then sleeps
    /// until the next one (or until a sooner one is added).
    fn run(&'static self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(entry) = state.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if !due.is_empty() {
                drop(state);
                for waker in due {
                    waker.wake();
                }
                state = self.lock();
                continue;
            }
            let next = state.waiting.first_key_value().map(|(k, _)| k.0);
            state.sleeps_until = next;
            state = match next {
                Some(at) => {
                    self.wake
                        .wait_timeout(state, at.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Starts the thread if it does not run; true when it runs. A thread
    /// that cannot be started is tried again at the next poll of any
    /// deadline, which meanwhile waits in tokio's timer instead.
    fn start(&'static self, state: &mut State) -> bool {
        if state.started {
            return true;
        }
        match std::thread::Builder::new()
            .name("courier-timer".into())
            .spawn(move || self.run())
        {
            Ok(_) => state.started = true,
            Err(e) if !state.start_failed => {
                state.start_failed = true;
                error!(error = %e, "could not start the timer thread; deadlines use tokio's timer until it starts");
            }
            Err(_) => {}
        }
        state.started
    }
}

/// A deadline for one task: [`Deadline::poll`] is ready once it passed,
/// and until then the task is woken when it passes.
#[derive(Default)]
pub(crate) struct Deadline {
    at: Option<Instant>,
    /// This deadline's entry in the table, while it has one.
    key: Option<(Instant, u64)>,
    /// Where the deadline waits when the thread could not be started.
    fallback: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Deadline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the deadline; the task's waker is registered for it at the
    /// next [`Self::poll`].
    pub fn reset(&mut self, at: Instant) {
        self.at = Some(at);
    }

    /// Ready once `now` (the caller's reading of the clock) is at or past
    /// the deadline; otherwise `cx`'s task will be woken when it is. Never
    /// ready while no deadline is set.
    pub fn poll(&mut self, now: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.at else {
            self.cancel();
            return Poll::Pending;
        };
        if now >= at {
            self.at = None;
            self.cancel();
            return Poll::Ready(());
        }
        let timers = timers();
        let mut state = timers.lock();
        if !timers.start(&mut state) {
            if let Some(old) = self.key.take() {
                state.waiting.remove(&old);
            }
            drop(state);
            return self.poll_fallback(at, cx);
        }
        self.fallback = None;
        if let Some(key) = self.key.filter(|k| k.0 == at) {
            // Still waiting there (unless the thread just woke it, for a
            // deadline our caller read the clock too early to see pass).
            if let Some(waker) = state.waiting.get_mut(&key) {
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
                return Poll::Pending;
            }
        }
        if let Some(old) = self.key.take() {
            state.waiting.remove(&old);
        }
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.insert((at, id), cx.waker().clone());
        self.key = Some((at, id));
        if state.sleeps_until.is_none_or(|t| at < t) {
            timers.wake.notify_one();
        }
        Poll::Pending
    }

    /// Waits for `at` in tokio's timer (outside the coop budget, so that
    /// `Pending` always means the waker is kept, as the table keeps it).
    fn poll_fallback(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let at = tokio::time::Instant::from_std(at);
        let sleep = self
            .fallback
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        let ready = std::pin::pin!(tokio::task::coop::unconstrained(sleep.as_mut()))
            .poll(cx)
            .is_ready();
        if ready {
            self.at = None;
            self.fallback = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Takes this deadline's entry out of the table.
    fn cancel(&mut self) {
        if let Some(key) = self.key.take() {
            timers().lock().waiting.remove(&key);
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        (c, w)
    }

    /// Waits (bounded) until `c` counted a wake.
    fn woken_within(c: &Count, limit: Duration) -> bool {
        woken_more_than(c, 0, limit)
    }

    /// Waits (bounded) until `c` counted more than `n` wakes.
    fn woken_more_than(c: &Count, n: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if c.0.load(Ordering::SeqCst) > n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        c.0.load(Ordering::SeqCst) > n
    }

    fn registered(d: &Deadline) -> bool {
        d.key
            .is_some_and(|k| timers().lock().waiting.contains_key(&k))
    }

    #[test]
    fn a_deadline_wakes_its_task_once_it_passed_and_not_before() {
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut d = Deadline::new();
        let now = Instant::now();
        let at = now + Duration::from_millis(30);
        d.reset(at);
        assert!(d.poll(now, &mut cx).is_pending());
        assert!(woken_within(&count, Duration::from_secs(30)));
        // The thread wakes only what is due: the clock is past `at` now.
        assert!(Instant::now() >= at);
        assert!(d.poll(Instant::now(), &mut cx).is_ready());
        assert!(!registered(&d));
        // Fired deadlines are not ready again until set again.
        assert!(d.poll(Instant::now(), &mut cx).is_pending());
    }

    #[test]
    fn a_sooner_deadline_wakes_the_sleeping_thread() {
        // A far deadline first: the thread sleeps until it (or longer).
        let (_, far_waker) = counter();
        let mut far = Deadline::new();
        let now = Instant::now();
        far.reset(now + Duration::from_secs(3600));
        assert!(far
            .poll(now, &mut Context::from_waker(&far_waker))
            .is_pending());
        std::thread::sleep(Duration::from_millis(20));
        let (count, waker) = counter();
        let mut near = Deadline::new();
        let now = Instant::now();
        near.reset(now + Duration::from_millis(10));
        assert!(near
            .poll(now, &mut Context::from_waker(&waker))
            .is_pending());
        assert!(woken_within(&count, Duration::from_secs(30)));
        assert!(registered(&far), "the far deadline still waits");
    }

    #[test]
    fn moving_or_dropping_a_deadline_takes_its_entry_out() {
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut d = Deadline::new();
        d.reset(Instant::now() + Duration::from_secs(3600));
        assert!(d.poll(Instant::now(), &mut cx).is_pending());
        let first = d.key.expect("registered");
        assert!(registered(&d));
        // Polled again for the same deadline: the same entry.
        assert!(d.poll(Instant::now(), &mut cx).is_pending());
        assert_eq!(d.key, Some(first));
        // Moved: the old entry goes.
        d.reset(Instant::now() + Duration::from_secs(7200));
        assert!(d.poll(Instant::now(), &mut cx).is_pending());
        assert_ne!(d.key, Some(first));
        assert!(!timers().lock().waiting.contains_key(&first));
        let second = d.key.expect("registered");
        drop(d);
        assert!(!timers().lock().waiting.contains_key(&second));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "nothing was due");
    }

    /// Where the thread could not be started, a deadline waits in
    /// tokio's timer instead, and is ready once passed.
    #[tokio::test]
    async fn the_fallback_waits_in_tokios_timer() {
        let mut d = Deadline::new();
        let at = Instant::now() + Duration::from_millis(20);
        d.reset(at);
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            std::future::poll_fn(|cx| d.poll_fallback(at, cx)),
        )
        .await;
        assert!(waited.is_ok(), "ready within 30 s");
        assert!(Instant::now() >= at);
        assert!(d.at.is_none() && d.fallback.is_none());
    }

    #[test]
    fn a_deadline_already_passed_is_ready_at_once() {
        let (count, waker) = counter();
        let mut d = Deadline::new();
        let now = Instant::now();
        d.reset(now);
        assert!(d.poll(now, &mut Context::from_waker(&waker)).is_ready());
        assert!(d.key.is_none());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_deadline_the_thread_fired_while_its_task_looked_is_registered_again() {
        // The caller read the clock just before the deadline; the thread
        // woke the entry meanwhile. Polling with the early reading must
        // not believe the entry still waits.
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        let mut d = Deadline::new();
        let early = Instant::now();
        let at = early + Duration::from_millis(5);
        d.reset(at);
        assert!(d.poll(early, &mut cx).is_pending());
        assert!(woken_within(&count, Duration::from_secs(30)));
        assert!(!registered(&d), "the thread took the entry");
        let before = count.0.load(Ordering::SeqCst);
        assert!(d.poll(early, &mut cx).is_pending());
        assert!(
            woken_more_than(&count, before, Duration::from_secs(30)),
            "woken again"
        );
    }
}
