//! An upstream's event stream in pieces: never panics, never holds more than its limit of an
//! unfinished event, and the same events come out whole or in pieces.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scopegate::http::sse::SseSplitter;

fn split(data: &[u8], piece: usize) -> Option<Vec<Vec<u8>>> {
    let mut s = SseSplitter::new(1024);
    let mut events = Vec::new();
    for p in data.chunks(piece.max(1)) {
        s.push(p);
        loop {
            match s.next_event() {
                Ok(Some(e)) => events.push(e.to_vec()),
                Ok(None) => {
                    assert!(s.pending() <= 1024);
                    break;
                }
                Err(_) => return None,
            }
        }
    }
    Some(events)
}

fuzz_target!(|data: &[u8]| {
    if let (Some(a), Some(b)) = (split(data, data.len()), split(data, 7)) {
        let strip = |v: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
            v.into_iter()
                .map(|e| e.into_iter().filter(|&c| c != b'\n').collect())
                .collect()
        };
        assert_eq!(strip(a), strip(b));
    }
});
