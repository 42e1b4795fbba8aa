//! An agent's request head and the framing it announces: never panics, never reads past the
//! buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scopegate::http::framing::request_framing;
use scopegate::http::head::{Head, parse_request};

fuzz_target!(|data: &[u8]| {
    let mut head = Head::default();
    if let Ok(Some(len)) = parse_request(data, &mut head) {
        assert!(len <= data.len());
        head.raw = bytes::Bytes::copy_from_slice(&data[..len]);
        let _ = request_framing(&head);
        let _ = head.iter().count();
    }
});
