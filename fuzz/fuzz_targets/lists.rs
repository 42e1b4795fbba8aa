//! An upstream's list answer (one message or a batch): never panics, and every item kept is one
//! the agent may see.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scopegate::mcp::lists::{ListKind, filter_lists};

fuzz_target!(|data: &[u8]| {
    let visible = |_: ListKind, name: &str| !name.contains("hidden");
    let Ok(Some(out)) = filter_lists(data, &visible) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_slice(&out).expect("filtered output is JSON");
    let messages = match &v {
        serde_json::Value::Array(batch) => batch.iter().collect(),
        one => vec![one],
    };
    for m in messages {
        for kind in [
            ListKind::Tools,
            ListKind::Prompts,
            ListKind::Resources,
            ListKind::ResourceTemplates,
        ] {
            let Some(items) = m.pointer(&format!("/result/{}", kind.field())) else {
                continue;
            };
            for item in items.as_array().expect("a list stays a list") {
                let name = item.get(kind.key()).and_then(|n| n.as_str());
                assert!(name.is_some_and(|n| !n.contains("hidden")), "{item}");
            }
        }
    }
});
