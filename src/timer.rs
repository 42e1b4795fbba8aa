//! Timeouts that cost a pointer instead of a timer. monoio's `Sleep` is 640 bytes aligned to
//! 128, and every future that awaits `monoio::time::timeout` carries one inline: a request's
//! state machine nests several (a read within an exchange within a request), each adding the
//! padding its alignment asks, and the request's memory is held for as long as it lasts (an
//! event stream: hours). Here a timeout takes a boxed `Sleep` from a per-thread pool only once
//! the future it bounds has to wait (a read whose bytes are already there never touches the
//! timer wheel), and gives it back when done: a pointer and a deadline in the future, and no
//! allocation in steady state.
//!
//! A pooled `Sleep` serves many tasks in turn, but monoio's keeps the first waker it is polled
//! with until it fires. So each pooled timer is polled only through its own [`Relay`] waker,
//! which wakes whichever task holds the timer now.
//!
//! Waits that only need to look up now and then (an open event stream checking for a drain or a
//! reload about once a second) do not need a timer at all: they wait for the thread's next
//! [`tick`], one shared timer per thread, holding a slot in its list of wakers.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

type Timer = Pin<Box<Pooled>>;

/// A timer that can be handed from task to task.
struct Pooled {
    sleep: monoio::time::Sleep,
    relay: Arc<Relay>,
    /// The waker the `Sleep` is polled with: wakes `relay`'s holder.
    waker: Waker,
}

/// Who holds a pooled timer now.
#[derive(Default)]
struct Relay {
    holder: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Taken out of the lock before waking it.
        let holder = self
            .holder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = holder {
            w.wake();
        }
    }
}

impl Pooled {
    fn new(deadline: Instant) -> Timer {
        let relay = Arc::new(Relay::default());
        Box::pin(Pooled {
            sleep: monoio::time::sleep_until(deadline.into()),
            waker: Waker::from(relay.clone()),
            relay,
        })
    }

    /// Whether the deadline passed; else `cx`'s task is woken when it does.
    fn poll_elapsed(self: Pin<&mut Self>, cx: &Context<'_>) -> bool {
        // SAFETY: `sleep` is structurally pinned (never moved out of the box); the other
        // fields are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let replaced = {
            let mut holder = this
                .relay
                .holder
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match &*holder {
                Some(w) if w.will_wake(cx.waker()) => None,
                _ => holder.replace(cx.waker().clone()),
            }
        };
        // Dropped after the lock (dropping a waker may drop a task).
        drop(replaced);
        let sleep = unsafe { Pin::new_unchecked(&mut this.sleep) };
        sleep.poll(&mut Context::from_waker(&this.waker)).is_ready()
    }

    fn reset(self: Pin<&mut Self>, deadline: Instant) {
        // SAFETY: as in `poll_elapsed`.
        let this = unsafe { self.get_unchecked_mut() };
        unsafe { Pin::new_unchecked(&mut this.sleep) }.reset(deadline.into());
    }

    /// Nobody holds it (back in the pool): a wake now goes nowhere.
    fn release(&self) {
        // The waker is dropped after the lock (dropping one may drop a task).
        let _old = self
            .relay
            .holder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// Timers kept per thread for reuse; more are freed when given back.
const KEEP: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Timer>> = const { RefCell::new(Vec::new()) };
}

/// How long a wait may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Forever,
    At(Instant),
    /// The thread's next tick: within [`TICK`] from now, shared by every such wait.
    NextTick,
    /// Once the thread's count of ticks is past the given one ([`Until::fixed`],
    /// [`Until::ticks_for`]).
    TickAfter(u64),
}

impl Until {
    /// At least `limit` from now, in the thread's ticks (no clock read, no timer: a wait that
    /// is rarely needed, a write bounded in case the peer stops reading). Ends between `limit`
    /// and [`TICK`] later, rounded up to whole ticks.
    pub fn ticks_for(limit: Duration) -> Until {
        let ticks = u64::try_from(limit.as_millis().div_ceil(TICK.as_millis())).unwrap_or(u64::MAX);
        let now = TICKS.with(|t| t.borrow().epoch);
        // One more than the limit's whole ticks: the next tick may come at once.
        Until::TickAfter(now.saturating_add(ticks))
    }

    /// The same bound, fixed now: a loop that waits several times within one bound (reading a
    /// body piece by piece) then ends at the same tick, however often it waits.
    pub fn fixed(self) -> Until {
        match self {
            Until::NextTick => Until::TickAfter(TICKS.with(|t| t.borrow().epoch)),
            until => until,
        }
    }
}

impl From<Option<Instant>> for Until {
    fn from(deadline: Option<Instant>) -> Until {
        deadline.map_or(Until::Forever, Until::At)
    }
}

/// How often the thread's tick comes (while anything waits for it).
pub const TICK: Duration = Duration::from_secs(1);

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `future`, bounded by `limit` from now (a limit too large to add is no limit).
pub fn timeout<F: Future>(limit: Duration, future: F) -> Timeout<F> {
    bounded(Instant::now().checked_add(limit).into(), future)
}

/// `future`, bounded as `until` says.
pub fn bounded<F: Future>(until: Until, future: F) -> Timeout<F> {
    Timeout {
        future,
        until,
        waiting: Waiting::Not,
    }
}

/// Waits for `limit` (a pooled timer, like [`timeout`]'s).
pub async fn sleep(limit: Duration) {
    let _ = timeout(limit, std::future::pending::<()>()).await;
}

/// A future with a deadline (see [`timeout`]).
pub struct Timeout<F> {
    future: F,
    until: Until,
    waiting: Waiting,
}

/// What a [`Timeout`] holds while its future waits.
enum Waiting {
    Not,
    Timer(Timer),
    /// A slot in the thread's tick list, taken at this tick.
    Tick {
        slot: usize,
        epoch: u64,
    },
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `future` is structurally pinned: it is never moved out of `self` (Drop only
        // takes the timer), and `Timeout` is not Unpin unless `F` is. The other fields are
        // not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let future = unsafe { Pin::new_unchecked(&mut this.future) };
        if let Poll::Ready(out) = future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if let Waiting::Not = this.waiting {
            this.waiting = match this.until {
                Until::Forever => return Poll::Pending,
                // A deadline already past fires at the timer's first poll.
                Until::At(deadline) => Waiting::Timer(take(deadline)),
                Until::NextTick => TICKS.with(|t| {
                    let mut t = t.borrow_mut();
                    let epoch = t.epoch;
                    t.join(epoch, cx)
                }),
                Until::TickAfter(epoch) => {
                    match TICKS.with(|t| (t.borrow().epoch > epoch).then_some(())) {
                        Some(()) => return Poll::Ready(Err(Elapsed)),
                        None => TICKS.with(|t| t.borrow_mut().join(epoch, cx)),
                    }
                }
            };
            if let Waiting::Tick { .. } = this.waiting {
                return Poll::Pending;
            }
        }
        let elapsed = match &mut this.waiting {
            Waiting::Not => false,
            Waiting::Timer(timer) => timer.as_mut().poll_elapsed(cx),
            Waiting::Tick { slot, epoch } => {
                // A replaced waker is dropped after the borrow (dropping one may drop a task).
                let (passed, _old) = TICKS.with(|t| t.borrow_mut().passed(*slot, *epoch, cx));
                passed
            }
        };
        match elapsed {
            true => Poll::Ready(Err(Elapsed)),
            false => Poll::Pending,
        }
    }
}

impl<F> Drop for Timeout<F> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.waiting, Waiting::Not) {
            Waiting::Not => {}
            Waiting::Timer(timer) => give(timer),
            Waiting::Tick { slot, .. } => {
                // The waker is dropped after the borrow (dropping one may drop a task).
                let _old = TICKS.try_with(|t| t.borrow_mut().leave(slot));
            }
        }
    }
}

thread_local! {
    static TICKS: RefCell<Ticks> = RefCell::new(Ticks::default());
}

/// The thread's tick: the wakers of the waits for the next one, and whether the task that
/// brings it runs (it stops when nothing waits).
#[derive(Default)]
struct Ticks {
    epoch: u64,
    wakers: Vec<Option<std::task::Waker>>,
    free: Vec<usize>,
    waiting: usize,
    running: bool,
}

impl Ticks {
    fn join(&mut self, epoch: u64, cx: &Context<'_>) -> Waiting {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.wakers.push(None);
                self.wakers.len() - 1
            }
        };
        self.wakers[slot] = Some(cx.waker().clone());
        self.waiting += 1;
        if !self.running {
            self.running = true;
            monoio::spawn(bring_ticks());
        }
        Waiting::Tick { slot, epoch }
    }

    /// Whether the tick after `epoch` came; else the waker is kept up to date (the one it
    /// replaces is handed back, to be dropped outside the borrow).
    fn passed(
        &mut self,
        slot: usize,
        epoch: u64,
        cx: &Context<'_>,
    ) -> (bool, Option<std::task::Waker>) {
        if self.epoch > epoch {
            return (true, None);
        }
        match &mut self.wakers[slot] {
            Some(w) if w.will_wake(cx.waker()) => (false, None),
            w => (false, w.replace(cx.waker().clone())),
        }
    }

    fn leave(&mut self, slot: usize) -> Option<std::task::Waker> {
        self.free.push(slot);
        self.waiting -= 1;
        self.wakers[slot].take()
    }
}

/// Wakes every wait for the tick, once per [`TICK`], while any waits.
async fn bring_ticks() {
    loop {
        monoio::time::sleep(TICK).await;
        let wakers: Vec<std::task::Waker> = TICKS.with(|t| {
            let mut t = t.borrow_mut();
            t.epoch += 1;
            t.wakers.iter_mut().filter_map(Option::take).collect()
        });
        wakers.into_iter().for_each(std::task::Waker::wake);
        let done = TICKS.with(|t| {
            let mut t = t.borrow_mut();
            let done = t.waiting == 0;
            if done {
                t.running = false;
            }
            done
        });
        if done {
            return;
        }
    }
}

/// Forgets this thread's pooled timers and ticks, which belong to the runtime that made them:
/// called when a runtime ends, so a later runtime on the same thread starts clean (a timer of
/// a finished runtime's driver would never fire).
pub fn end_of_runtime() {
    // Taken out first and dropped after the borrows: dropping a waker may drop a task, whose
    // timeouts then give back their timers or leave their tick slots.
    // The tick's slots are kept (a wait that outlived its runtime still leaves its own); its
    // wakers go, and the next runtime's first wait starts a tick task of its own.
    let timers = POOL.try_with(|p| std::mem::take(&mut *p.borrow_mut()));
    let wakers = TICKS.try_with(|t| {
        let mut t = t.borrow_mut();
        t.running = false;
        t.wakers.iter_mut().map(Option::take).collect::<Vec<_>>()
    });
    drop((timers, wakers));
}

fn take(deadline: Instant) -> Timer {
    let pooled = POOL.with(|p| p.borrow_mut().pop());
    match pooled {
        Some(mut timer) => {
            timer.as_mut().reset(deadline);
            timer
        }
        None => Pooled::new(deadline),
    }
}

/// Back to the pool, still armed: re-arming it to a far deadline would cost a second trip
/// through the timer wheel per wait, and under load a pooled timer is taken (and reset) again
/// long before its old deadline. Its holder is forgotten, so one left in the pool until that
/// deadline wakes nobody.
fn give(timer: Timer) {
    timer.release();
    // A pool on a thread being torn down (or a full one) frees the timer instead.
    let _ = POOL.try_with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < KEEP {
            pool.push(timer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_ready_future_takes_no_timer_and_a_slow_one_times_out() {
        runtime().block_on(async {
            assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
            assert_eq!(POOL.with(|p| p.borrow().len()), 0, "no timer was needed");
            let slow = monoio::time::sleep(Duration::from_secs(5));
            let started = Instant::now();
            assert_eq!(timeout(Duration::from_millis(20), slow).await, Err(Elapsed));
            assert!(started.elapsed() >= Duration::from_millis(20));
            assert_eq!(POOL.with(|p| p.borrow().len()), 1, "the timer went back");
        });
    }

    #[test]
    fn a_pooled_timer_is_reset_to_each_new_deadline() {
        runtime().block_on(async {
            for _ in 0..3 {
                let fast = monoio::time::sleep(Duration::from_millis(5));
                assert_eq!(timeout(Duration::from_secs(10), fast).await, Ok(()));
                let slow = monoio::time::sleep(Duration::from_secs(10));
                assert_eq!(timeout(Duration::from_millis(5), slow).await, Err(Elapsed));
            }
            assert_eq!(
                POOL.with(|p| p.borrow().len()),
                1,
                "one timer served them all"
            );
            let past = Instant::now() - Duration::from_millis(1);
            let never = std::future::pending::<()>();
            assert_eq!(bounded(Until::At(past), never).await, Err(Elapsed));
        });
    }

    #[test]
    fn a_pooled_timer_wakes_the_task_that_took_it_not_the_one_that_gave_it_back() {
        runtime().block_on(async {
            // Task A waits on a timer, but its future finishes first: the timer goes back to
            // the pool armed, having been polled by A.
            let a = monoio::spawn(async {
                let quick = monoio::time::sleep(Duration::from_millis(5));
                timeout(Duration::from_secs(30), quick).await
            });
            assert_eq!(a.await, Ok(()));
            assert_eq!(POOL.with(|p| p.borrow().len()), 1);
            // Task B takes that timer; its own deadline must wake B (a monoio `Sleep` keeps
            // the first waker it was polled with until it fires).
            let b = monoio::spawn(async {
                timeout(Duration::from_millis(20), std::future::pending::<()>()).await
            });
            let guard = monoio::time::timeout(Duration::from_secs(5), b).await;
            assert_eq!(guard, Ok(Err(Elapsed)), "task B was never woken");
        });
    }

    #[test]
    fn waits_for_the_tick_share_it_and_leave_no_slot_behind() {
        runtime().block_on(async {
            let started = Instant::now();
            let never = || std::future::pending::<()>();
            let (a, b) = monoio::join!(
                bounded(Until::NextTick, never()),
                bounded(Until::NextTick, never())
            );
            assert_eq!((a, b), (Err(Elapsed), Err(Elapsed)));
            assert!(started.elapsed() <= TICK * 3, "{:?}", started.elapsed());
            // A wait that ends first leaves its slot; a ready future takes none.
            let quick = monoio::time::sleep(Duration::from_millis(5));
            assert_eq!(bounded(Until::NextTick, quick).await, Ok(()));
            assert_eq!(bounded(Until::NextTick, async { 3 }).await, Ok(3));
            TICKS.with(|t| {
                let t = t.borrow();
                assert_eq!(t.waiting, 0);
                assert_eq!(t.free.len(), t.wakers.len());
                assert!(t.wakers.len() <= 2, "slots are reused");
            });
        });
    }

    #[test]
    fn a_fixed_tick_bound_ends_at_the_same_tick_however_often_it_waits() {
        runtime().block_on(async {
            let until = Until::NextTick.fixed();
            let started = Instant::now();
            // Waits shorter than a tick, one after another under the same bound: the bound
            // still ends within about a tick, not never.
            let mut waits = 0;
            loop {
                let short = monoio::time::sleep(Duration::from_millis(100));
                match bounded(until, short).await {
                    Ok(()) => waits += 1,
                    Err(Elapsed) => break,
                }
                assert!(waits < 50, "the bound never ended");
            }
            assert!(started.elapsed() <= TICK * 3, "{:?}", started.elapsed());
        });
    }

    #[test]
    fn a_bound_in_ticks_is_never_shorter_than_its_limit() {
        runtime().block_on(async {
            let never = || std::future::pending::<()>();
            let started = Instant::now();
            let until = Until::ticks_for(Duration::from_millis(300));
            assert_eq!(bounded(until, never()).await, Err(Elapsed));
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(300), "{took:?}");
            assert!(took <= TICK * 3, "{took:?}");
            // Once a tick is under way (the task runs), the bound still lasts its limit.
            let started = Instant::now();
            let until = Until::ticks_for(Duration::from_millis(1500));
            assert_eq!(bounded(until, never()).await, Err(Elapsed));
            assert!(started.elapsed() >= Duration::from_millis(1500));
        });
    }

    #[test]
    fn a_timeout_costs_a_few_words_not_a_timer() {
        let size = std::mem::size_of::<Timeout<std::future::Ready<()>>>();
        assert!(size <= 48, "{size} bytes");
        assert_eq!(std::mem::align_of::<Timeout<std::future::Ready<()>>>(), 8);
    }
}
