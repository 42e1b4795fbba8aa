//! A single-producer single-consumer byte ring: the worker thread pushes encoded audit entries,
//! its writer thread takes them in batches. Lock-free: two monotonically increasing positions,
//! each written by one side only; records are a 4-byte length and the bytes, wrapping freely.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct ByteRing {
    buf: Box<[UnsafeCell<u8>]>,
    mask: usize,
    /// Total bytes ever pushed (written by the producer only).
    head: AtomicUsize,
    /// Total bytes ever taken (written by the consumer only).
    tail: AtomicUsize,
}

// SAFETY: the producer writes only the free region [head, tail + cap) and publishes it with a
// release store of `head`; the consumer reads only [tail, head) after an acquire load of `head`
// and frees it with a release store of `tail`. The regions never overlap.
unsafe impl Sync for ByteRing {}
unsafe impl Send for ByteRing {}

const LEN: usize = 4;

impl ByteRing {
    /// A ring of at least `capacity` bytes (rounded up to a power of two).
    pub fn new(capacity: usize) -> ByteRing {
        let cap = capacity.next_power_of_two().max(1024);
        ByteRing {
            buf: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            mask: cap - 1,
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Bytes waiting for the consumer.
    pub fn used(&self) -> usize {
        self.head.load(Ordering::Acquire) - self.tail.load(Ordering::Acquire)
    }

    /// The largest record that can ever fit.
    pub fn max_record(&self) -> usize {
        self.capacity() - LEN
    }

    /// Producer: appends one record, or returns false when there is not room for it now.
    pub fn try_push(&self, record: &[u8]) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        let need = LEN + record.len();
        if self.capacity() - (head - tail) < need {
            return false;
        }
        self.copy_in(head, &(record.len() as u32).to_le_bytes());
        self.copy_in(head + LEN, record);
        self.head.store(head + need, Ordering::Release);
        true
    }

    /// Consumer: calls `f` with each waiting record, in order, then frees them. Returns how
    /// many were taken. A record is lent straight from the ring unless it wraps around the end
    /// (then it is copied once into a scratch buffer).
    pub fn drain(&self, f: impl FnMut(&[u8])) -> usize {
        self.drain_up_to(usize::MAX, f)
    }

    /// [`drain`](Self::drain), stopping once at least `max_bytes` of records were taken (so a
    /// consumer can work in bounded slices).
    pub fn drain_up_to(&self, max_bytes: usize, mut f: impl FnMut(&[u8])) -> usize {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        let mut wrapped = Vec::new();
        let mut n = 0;
        let start = tail;
        while tail < head && tail - start < max_bytes {
            let mut len = [0u8; LEN];
            self.copy_out(tail, &mut len);
            let len = u32::from_le_bytes(len) as usize;
            let start = (tail + LEN) & self.mask;
            if start + len <= self.capacity() {
                // SAFETY: [tail + LEN, tail + LEN + len) lies in [tail, head), published by
                // the producer and not reused until `tail` moves past it below; it does not
                // wrap, so it is one contiguous run of the buffer.
                let record =
                    unsafe { std::slice::from_raw_parts(self.buf[start].get().cast_const(), len) };
                f(record);
            } else {
                wrapped.resize(len, 0);
                self.copy_out(tail + LEN, &mut wrapped);
                f(&wrapped);
            }
            tail += LEN + len;
            n += 1;
        }
        self.tail.store(tail, Ordering::Release);
        n
    }

    fn copy_in(&self, pos: usize, data: &[u8]) {
        let start = pos & self.mask;
        let first = data.len().min(self.capacity() - start);
        // SAFETY: [pos, pos + data.len()) is in the producer's free region (checked by the
        // caller), so no reader touches these bytes until `head` is published.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf[start].get(), first);
            if first < data.len() {
                std::ptr::copy_nonoverlapping(
                    data[first..].as_ptr(),
                    self.buf[0].get(),
                    data.len() - first,
                );
            }
        }
    }

    fn copy_out(&self, pos: usize, out: &mut [u8]) {
        let start = pos & self.mask;
        let first = out.len().min(self.capacity() - start);
        // SAFETY: [pos, pos + out.len()) lies in [tail, head), published by the producer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.buf[start].get(), out.as_mut_ptr(), first);
            if first < out.len() {
                std::ptr::copy_nonoverlapping(
                    self.buf[0].get(),
                    out[first..].as_mut_ptr(),
                    out.len() - first,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn records_wrap_and_come_out_in_order() {
        let ring = ByteRing::new(1024);
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for i in 0..1000u32 {
            let rec = format!("record-{i}-{}", "x".repeat((i % 97) as usize));
            if !ring.try_push(rec.as_bytes()) {
                ring.drain(|r| got.push(String::from_utf8(r.to_vec()).unwrap()));
                assert!(ring.try_push(rec.as_bytes()));
            }
            expected.push(rec);
        }
        ring.drain(|r| got.push(String::from_utf8(r.to_vec()).unwrap()));
        assert_eq!(got, expected);
        assert_eq!(ring.used(), 0);
    }

    #[test]
    fn full_ring_refuses_and_oversized_never_fits() {
        let ring = ByteRing::new(1024);
        assert!(!ring.try_push(&vec![0u8; 1021]));
        assert!(ring.try_push(&vec![1u8; 1020]));
        assert!(!ring.try_push(b"x"));
        assert_eq!(ring.drain(|r| assert_eq!(r.len(), 1020)), 1);
        assert!(ring.try_push(b"x"));
    }

    #[test]
    fn producer_and_consumer_threads_lose_nothing() {
        let ring = Arc::new(ByteRing::new(4096));
        let producer = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                for i in 0..100_000u64 {
                    let rec = i.to_le_bytes();
                    while !ring.try_push(&rec) {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut next = 0u64;
        while next < 100_000 {
            ring.drain(|r| {
                assert_eq!(u64::from_le_bytes(r.try_into().unwrap()), next);
                next += 1;
            });
        }
        producer.join().unwrap();
    }
}
