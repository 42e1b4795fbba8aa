//! The JSON-RPC envelope of an agent's body: never panics; what it accepts, serde_json reads
//! the same way (method, name, uri).
#![no_main]
use libfuzzer_sys::fuzz_target;
use scopegate::mcp::envelope::EnvelopeParser;

fuzz_target!(|data: &[u8]| {
    let mut parser = EnvelopeParser::new();
    if let Ok(env) = parser.parse(data)
        && let Some(m) = env.single()
    {
        let v: serde_json::Value = serde_json::from_slice(data).expect("accepted invalid JSON");
        assert_eq!(m.method, v.get("method").and_then(|x| x.as_str()));
        let params = v.get("params");
        assert_eq!(m.name, params.and_then(|p| p.get("name")).and_then(|x| x.as_str()));
        assert_eq!(m.uri, params.and_then(|p| p.get("uri")).and_then(|x| x.as_str()));
    }
});
