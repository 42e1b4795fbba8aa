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
