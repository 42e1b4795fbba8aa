//! A chunked body from either side, fed whole and byte by byte: the same outcome both ways.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use scopegate::http::framing::ChunkedDecoder;

fuzz_target!(|data: &[u8]| {
    let mut whole = ChunkedDecoder::default();
    let mut out_whole = BytesMut::new();
    let r_whole = whole.feed(data, Some(&mut out_whole));
    let mut bytewise = ChunkedDecoder::default();
    let mut out_bytes = BytesMut::new();
    let mut used = 0;
    let mut failed = false;
    for b in data {
        if bytewise.is_done() {
            break;
        }
        match bytewise.feed(std::slice::from_ref(b), Some(&mut out_bytes)) {
            Ok(n) => used += n,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match r_whole {
        Ok(n) => {
            assert!(!failed);
            assert_eq!(n, used);
            assert_eq!(out_whole, out_bytes);
        }
        Err(_) => assert!(failed),
    }
});
