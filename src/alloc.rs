//! Heap allocations counted on worker threads, for `scopegate_heap_allocations_total` in
//! `/metrics` (and so the allocations-per-request figure of the benchmarks). Each worker points
//! its thread's counter at its own stats; other threads (the main thread, audit writers) are not
//! counted. A count is a relaxed load and store on a word only that thread writes: no lock, no
//! read-modify-write.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Wraps the real allocator and counts allocations (and reallocations) on counted threads.
pub struct Counting<A>(pub A);

thread_local! {
    static COUNTER: Cell<*const AtomicU64> = const { Cell::new(std::ptr::null()) };
}

/// Counts this thread's allocations into `counter` from now on. `counter` must live as long as
/// the thread allocates (the workers' stats live for the whole process).
pub fn count_into(counter: &'static AtomicU64) {
    COUNTER.with(|c| c.set(counter));
}

#[inline]
fn count() {
    let _ = COUNTER.try_with(|c| {
        let p = c.get();
        if !p.is_null() {
            // SAFETY: set by count_into from a &'static AtomicU64.
            let counter = unsafe { &*p };
            counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    });
}

// SAFETY: every call is passed through to the wrapped allocator unchanged.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// Memory for one kind of future, kept for reuse: each request of a connection runs in a block
/// taken from here and given back when it ends. Serving a request then allocates nothing in
/// steady state, and an idle connection still holds no request state (it is not in the
/// connection's task).
pub struct FutureBlocks {
    free: std::cell::RefCell<Vec<std::ptr::NonNull<u8>>>,
    /// The layout of the future this pool serves (the first one it ran).
    layout: Cell<Option<Layout>>,
    /// Blocks kept beyond those in use; more are freed when given back.
    keep: usize,
}

impl FutureBlocks {
    pub fn new(keep: usize) -> FutureBlocks {
        FutureBlocks {
            free: std::cell::RefCell::new(Vec::new()),
            layout: Cell::new(None),
            keep,
        }
    }

    /// `f` moved into a block of this pool, as a small future that runs it there (a future of
    /// another layout than the first, or of none, is boxed as usual). Not an `async fn`: its
    /// argument would live in the caller's state, which is what the block is for.
    pub fn run<'p, 'f, F: std::future::Future + 'f>(&'p self, f: F) -> InBlock<'p, 'f, F::Output> {
        let layout = Layout::new::<F>();
        if layout.size() == 0 || *self.layout.get().get_or_insert(layout) != layout {
            return InBlock::Boxed(Box::pin(f));
        }
        self.layout.set(Some(layout));
        let block = self.free.borrow_mut().pop().unwrap_or_else(|| {
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc(layout) };
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        });
        // SAFETY: the block is F's size and alignment and holds nothing live.
        unsafe { block.cast::<F>().as_ptr().write(f) };
        InBlock::Slot {
            borrows: std::marker::PhantomData,
            slot: Slot {
                pool: self,
                block,
                drop_future: |p| {
                    // SAFETY: the block holds a live F, written above and not yet dropped.
                    unsafe { std::ptr::drop_in_place(p.cast::<F>().as_ptr()) }
                },
            },
            poll: |p, cx| {
                // SAFETY: the block holds a live F that is never moved: the block is not
                // reused or freed before the Slot drops the F in place.
                let f = unsafe { std::pin::Pin::new_unchecked(&mut *p.cast::<F>().as_ptr()) };
                f.poll(cx)
            },
        }
    }
}

/// A future running in a block of a [`FutureBlocks`] (or boxed): two pointers and a function,
/// whatever the size of the future it runs.
/// `'f`: what the future borrows, which must outlive it wherever it runs.
pub enum InBlock<'p, 'f, T> {
    Slot {
        slot: Slot<'p>,
        poll: fn(std::ptr::NonNull<u8>, &mut std::task::Context<'_>) -> std::task::Poll<T>,
        borrows: std::marker::PhantomData<&'f ()>,
    },
    Boxed(std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'f>>),
}

impl<T> std::future::Future for InBlock<'_, '_, T> {
    type Output = T;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.get_mut() {
            InBlock::Slot { slot, poll, .. } => poll(slot.block, cx),
            InBlock::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// A block in use; dropping it drops its future and gives the block back.
pub struct Slot<'a> {
    pool: &'a FutureBlocks,
    block: std::ptr::NonNull<u8>,
    drop_future: fn(std::ptr::NonNull<u8>),
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        (self.drop_future)(self.block);
        let mut free = self.pool.free.borrow_mut();
        if free.len() < self.pool.keep {
            free.push(self.block);
        } else if let Some(layout) = self.pool.layout.get() {
            // SAFETY: allocated above with this pool's layout, and no longer in use.
            unsafe { std::alloc::dealloc(self.block.as_ptr(), layout) };
        }
    }
}

impl Drop for FutureBlocks {
    fn drop(&mut self) {
        if let Some(layout) = self.layout.get() {
            for block in self.free.get_mut().drain(..) {
                // SAFETY: every free block was allocated with this layout and holds nothing.
                unsafe { std::alloc::dealloc(block.as_ptr(), layout) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// Counts drops, to see every future dropped exactly once.
    struct Token(Rc<Cell<u32>>);
    impl Drop for Token {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn blocks_are_reused_and_every_future_is_dropped_once() {
        let pool = FutureBlocks::new(2);
        let drops = Rc::new(Cell::new(0));
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let make = |n: u64, ms: u64| {
                let token = Token(drops.clone());
                async move {
                    monoio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    let _keep = &token;
                    [n; 64].iter().sum::<u64>()
                }
            };
            assert_eq!(pool.run(make(1, 1)).await, 64);
            let first = pool.free.borrow()[0];
            assert_eq!(pool.run(make(2, 1)).await, 128);
            assert_eq!(pool.free.borrow().len(), 1, "one block, reused");
            assert_eq!(pool.free.borrow()[0], first);
            // Dropped before it ends: the future is dropped in place, the block comes back.
            // (It sleeps far longer than the timeout: it cannot finish first on a busy machine.)
            let unfinished = pool.run(make(3, 60_000));
            let timed_out = monoio::time::timeout(std::time::Duration::ZERO, unfinished).await;
            assert!(timed_out.is_err());
            assert_eq!(pool.free.borrow().len(), 1);
        });
        assert_eq!(drops.get(), 3);
    }
}
