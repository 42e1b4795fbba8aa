//! A worker's fleet-wide limiter: calls spend leased tokens ([`super::lease`]) and ask Redis
//! ([`super::fleet`]) only when a lease runs out.
//!
//! A call takes a leased token from each of its buckets with one atomic operation each. When a
//! lease runs low, a refill is queued on the worker's Redis link and the call goes on. When a
//! lease is empty the call asks Redis for one token and a lease's worth, and waits at most
//! `SCOPEGATE_REDIS_TIMEOUT_MS` for all its buckets together; other calls on the worker that
//! find the same lease empty meanwhile wait for that one request instead of sending their own.
//! When Redis says the bucket is empty, the refusal says how long until a token, and calls do
//! not ask again before a lease's worth could have accrued (at most 100 ms), so Redis traffic
//! follows the limit's rate, not the refused load. When Redis is unreachable (or did not answer
//! in time) the configured [`Fallback`] decides: each replica enforces its share of the limit
//! (the limit divided by the replicas seen), or limited calls are refused. Calls that no limit
//! covers never touch any of this.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::bucket::{Bucket, Gcra, Limited, now_ns};
use super::fleet::{Fallback, Fleet, granted, heartbeat, lease_size, local_share, unexpected};
use super::lease::Take;
use super::limit::{Use, Uses};
use crate::redis::{self, Failure, Link, Value};

/// How a call's token was taken, so that it can be given back the same way.
#[derive(Clone, Copy)]
enum How {
    Leased,
    /// From the bucket's local share while Redis was unreachable.
    Share(Gcra),
}

/// What a request to Redis came back with.
#[derive(Clone, Copy)]
enum Answer {
    Granted,
    /// Nothing left: one token in this many ns.
    Empty(u64),
    Failed,
}

/// A request for tokens in flight, which calls on this worker wait for.
#[derive(Default)]
struct Ask {
    answer: Cell<Option<Answer>>,
    wakers: RefCell<Vec<Waker>>,
    /// One granted token is kept for the call that asked (while it still waits).
    reserve: Cell<bool>,
}

impl Ask {
    fn set(&self, a: Answer) {
        self.answer.set(Some(a));
        for w in self.wakers.take() {
            w.wake();
        }
    }

    async fn wait(&self) -> Answer {
        poll_fn(|cx| match self.answer.get() {
            Some(a) => Poll::Ready(a),
            None => {
                let mut wakers = self.wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}

/// Gives up an ask's reserved token when the call that asked stops waiting (timed out, or its
/// future dropped): the token then goes to the lease.
struct Reserved<'a>(&'a Ask);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.reserve.set(false);
    }
}

/// The asks in flight on this worker, one per bucket at most (by the bucket's address).
type Pending = Rc<RefCell<Vec<(*const Bucket, Rc<Ask>)>>>;

/// One worker's fleet-wide limiter: the fleet, this worker's link to Redis, its asks.
pub struct FleetLimiter {
    fleet: Arc<Fleet>,
    /// This worker's index (its counters in the fleet).
    worker: usize,
    link: Link,
    pending: Pending,
}

impl FleetLimiter {
    /// Starts this worker's link (and, on worker 0, the replica's heartbeat) on the current
    /// runtime.
    pub fn start(fleet: Arc<Fleet>, worker: usize) -> FleetLimiter {
        let link = Link::start(fleet.client.clone());
        if worker == 0 {
            monoio::spawn(heartbeat(fleet.clone(), link.clone()));
        }
        FleetLimiter {
            worker: worker.min(fleet.counters.len() - 1),
            fleet,
            link,
            pending: Pending::default(),
        }
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Takes one token from every limit in `uses`, or none.
    pub async fn admit<'a>(&self, uses: &impl Uses<'a>) -> Result<(), Limited> {
        let now = now_ns();
        // Most calls: a leased token from each bucket, nothing else.
        let mut taken = 0usize;
        let mut short = false;
        let mut refused = None;
        uses.visit(|u| {
            let b = u.limit.state.bucket(u.name, Some(now));
            match b.lease.take() {
                Take::Taken => {}
                Take::TakenRefill => self.refill(&b),
                Take::Empty => {
                    short = true;
                    // Redis said lately that this bucket is drained: refused here and now
                    // (a limit under attack costs what a local one does).
                    if self.link.is_up()
                        && let Some(wait) = b.lease.known_empty(now)
                    {
                        refused = Some(b.refusal(wait));
                    }
                }
            }
            taken += usize::from(!short);
            !short
        });
        if !short {
            return Ok(());
        }
        self.put_back(uses, taken);
        if let Some(refused) = refused {
            return Err(refused);
        }
        // Boxed: the slow path's state (timers, the buckets taken) is large and rare, and would
        // otherwise grow every request's state.
        Box::pin(self.admit_slow(uses)).await
    }

    /// Gives back what [`admit`](Self::admit) took: to the leases, or to the local shares
    /// while Redis is unreachable (where the tokens came from then).
    pub fn release<'a>(&self, uses: &impl Uses<'a>) {
        if self.link.is_up() {
            self.put_back(uses, usize::MAX);
            return;
        }
        let replicas = self.fleet.replicas();
        uses.visit(|u| {
            let b = u.limit.state.bucket(u.name, None);
            b.give_back_with(local_share(b.limit, replicas));
            true
        });
    }

    /// Gives the first `n` tokens of `uses` back to their leases.
    fn put_back<'a>(&self, uses: &impl Uses<'a>, mut n: usize) {
        uses.visit(|u: Use<'a>| {
            if n == 0 {
                return false;
            }
            u.limit.state.bucket(u.name, None).lease.put_back();
            n -= 1;
            true
        });
    }

    /// A lease ran out on one of the buckets: each is taken in turn, asking Redis where needed,
    /// all within one timeout.
    #[cold]
    async fn admit_slow<'a>(&self, uses: &impl Uses<'a>) -> Result<(), Limited> {
        let mut buckets: Vec<Arc<Bucket>> = Vec::new();
        uses.visit(|u| {
            buckets.push(Arc::clone(&u.limit.state.bucket(u.name, Some(now_ns()))));
            true
        });
        let deadline = Instant::now() + self.fleet.settings.timeout;
        // Whatever was taken goes back unless every bucket gave a token, also when this
        // future is dropped midway (the agent went away).
        let mut taken = Taken(Vec::with_capacity(buckets.len()));
        for b in buckets {
            let how = self.take_one(&b, deadline).await?;
            taken.0.push((b, how));
        }
        taken.0.clear();
        Ok(())
    }

    async fn take_one(&self, b: &Arc<Bucket>, deadline: Instant) -> Result<How, Limited> {
        loop {
            let now = now_ns();
            match b.lease.take() {
                Take::Taken => return Ok(How::Leased),
                Take::TakenRefill => {
                    self.refill(b);
                    return Ok(How::Leased);
                }
                Take::Empty => {}
            }
            if !self.link.is_up() {
                return self.fallback(b, now);
            }
            if let Some(wait) = b.lease.known_empty(now) {
                return Err(b.refusal(wait));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Redis answers, but other calls took every token granted meanwhile.
                return Err(b.refusal(Duration::from_millis(1).as_nanos() as u64));
            }
            let key = Arc::as_ptr(b);
            let out = self
                .pending
                .borrow()
                .iter()
                .find(|(p, _)| *p == key)
                .map(|(_, a)| a.clone());
            if let Some(ask) = out {
                // Another call on this worker is asking for this bucket: its tokens go to the
                // lease (after its own), so wait for it and take again.
                match crate::timer::timeout(left, ask.wait()).await {
                    Ok(Answer::Granted) => continue,
                    Ok(Answer::Empty(wait)) => return Err(b.refusal(wait)),
                    Ok(Answer::Failed) | Err(_) => return self.fallback(b, now_ns()),
                }
            }
            let ask = Rc::new(Ask::default());
            ask.reserve.set(true);
            let reserved = Reserved(&ask);
            self.pending.borrow_mut().push((key, ask.clone()));
            // One token for this call, and a lease's worth for the calls after it if no refill
            // is under way (on any worker): a replica holds about one lease per bucket.
            let refill = b.lease.start_refill();
            let want = 1 + if refill { self.size(b) } else { 0 };
            self.ask(b, want, refill, Some(ask.clone()));
            let answer = crate::timer::timeout(left, ask.wait()).await;
            drop(reserved);
            return match answer {
                Ok(Answer::Granted) => Ok(How::Leased),
                Ok(Answer::Empty(wait)) => Err(b.refusal(wait)),
                Ok(Answer::Failed) | Err(_) => self.fallback(b, now_ns()),
            };
        }
    }

    /// Redis could not be asked: the configured fallback decides.
    fn fallback(&self, b: &Bucket, now: u64) -> Result<How, Limited> {
        self.fleet.counters[self.worker]
            .fallbacks
            .fetch_add(1, Ordering::Relaxed);
        match self.fleet.settings.fallback {
            Fallback::Local => {
                let share = local_share(b.limit, self.fleet.replicas());
                match b.try_take_with(share, now) {
                    Ok(()) => Ok(How::Share(share)),
                    Err(wait) => Err(b.refusal(wait)),
                }
            }
            Fallback::Closed => Err(Limited {
                label: format!(
                    "{} (the fleet's Redis is unreachable and SCOPEGATE_REDIS_FALLBACK=closed)",
                    b.label
                ),
                retry_after_ns: redis::link::RETRY.as_nanos() as u64,
            }),
        }
    }

    fn size(&self, b: &Bucket) -> u64 {
        lease_size(b.limit, self.fleet.replicas())
    }

    /// The lease of `b` is low: a lease's worth more, asked in the background (unless Redis
    /// said lately that the bucket is drained).
    fn refill(&self, b: &Arc<Bucket>) {
        if b.lease.known_empty(now_ns()).is_some() {
            b.lease.end_refill();
            return;
        }
        self.ask(b, self.size(b), true, None);
    }

    /// Asks Redis for `want` tokens of `b`. Granted tokens go to the lease, but one for the
    /// call that asked while it waits; `refill` says this request holds the bucket's refill
    /// claim.
    fn ask(&self, b: &Arc<Bucket>, want: u64, refill: bool, ask: Option<Rc<Ask>>) {
        let fleet = self.fleet.clone();
        let size = self.size(b);
        // What a lease's worth takes to accrue: the soonest a drained bucket is asked again.
        let accrue = size.saturating_mul(b.limit.interval);
        let command = fleet.take_command(b, want);
        let pending = self.pending.clone();
        let worker = self.worker;
        let b = Arc::clone(b);
        let done: redis::Done = Box::new(move |reply: Result<Value, Failure>| {
            if refill {
                b.lease.end_refill();
            }
            if let Some(ask) = &ask {
                pending.borrow_mut().retain(|(_, a)| !Rc::ptr_eq(a, ask));
            }
            let answer = match granted(&reply) {
                Some((n, _)) if n > 0 => {
                    // Never more than asked, whatever the reply says.
                    let n = n.min(want);
                    fleet.counters[worker]
                        .leased
                        .fetch_add(n, Ordering::Relaxed);
                    let reserved = ask.as_ref().is_some_and(|a| a.reserve.get());
                    let keep = n - u64::from(reserved);
                    let now = now_ns();
                    if keep > 0 {
                        b.lease.put(keep, now, size, b.limit.interval);
                    }
                    if n < want {
                        // Less than asked: the bucket is drained now. Spend what came, then ask
                        // again once a lease's worth could have accrued, not per token.
                        b.lease.set_empty(now, b.limit.interval, accrue);
                    }
                    Answer::Granted
                }
                Some((_, wait_us)) => {
                    // At most a day: a reply cannot push the clock arithmetic over.
                    let wait = wait_us
                        .saturating_mul(1000)
                        .clamp(1, 86_400 * 1_000_000_000);
                    b.lease.set_empty(now_ns(), wait, accrue);
                    Answer::Empty(wait)
                }
                None => {
                    if let Ok(v) = &reply {
                        unexpected(v);
                    }
                    Answer::Failed
                }
            };
            if let Some(ask) = ask {
                ask.set(answer);
            }
        });
        if let Err(done) = self.link.send(command, done) {
            done(Err(Failure::Down("not connected".into())));
        }
    }
}

/// The tokens a call took so far from its buckets; given back when dropped (cleared once the
/// call has them all).
struct Taken(Vec<(Arc<Bucket>, How)>);

impl Drop for Taken {
    fn drop(&mut self) {
        for (b, how) in self.0.drain(..) {
            match how {
                How::Leased => b.lease.put_back(),
                How::Share(g) => b.give_back_with(g),
            }
        }
    }
}
