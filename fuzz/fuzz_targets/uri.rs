//! Resource URIs an agent sends: never panics; the canonical form is a fixed point with no
//! backslash, control character, dot segment or repeated slash in its path.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scopegate::mcp::uri::{Mode, canonical, canonical_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [Mode::Uri, Mode::Template, Mode::Pattern] {
        if let Ok(c) = canonical(text, mode) {
            assert_eq!(canonical(&c, mode).as_deref(), Ok(c.as_str()));
            assert!(!c.contains('\\') && !c.chars().any(char::is_control));
        }
    }
    if let Ok(p) = canonical_path(text) {
        assert!(!p.split('/').any(|s| s == ".."));
        assert_eq!(canonical_path(&p).as_deref(), Ok(p.as_str()));
    }
});
