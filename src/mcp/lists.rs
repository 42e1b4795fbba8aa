//! Discovery filtering: rewrite `tools/list`, `prompts/list`, `resources/list` and
//! `resources/templates/list` results so they hold only what the agent may use. Works on a JSON
//! body or on an SSE body (each event's data is checked; the one carrying the result is
//! rewritten, the others pass unchanged). Everything else in the result (`nextCursor`, `_meta`)
//! is kept, so pagination works page by page.

use simd_json::OwnedValue;
use simd_json::prelude::*;

/// Which list a response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    ResourceTemplates,
}

impl ListKind {
    pub fn for_method(method: &str) -> Option<ListKind> {
        match method {
            "tools/list" => Some(ListKind::Tools),
            "prompts/list" => Some(ListKind::Prompts),
            "resources/list" => Some(ListKind::Resources),
            "resources/templates/list" => Some(ListKind::ResourceTemplates),
            _ => None,
        }
    }

    /// The list method answering with this kind.
    pub fn method(self) -> &'static str {
        match self {
            ListKind::Tools => "tools/list",
            ListKind::Prompts => "prompts/list",
            ListKind::Resources => "resources/list",
            ListKind::ResourceTemplates => "resources/templates/list",
        }
    }

    /// The member of a list result holding the items.
    pub fn field(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
            ListKind::ResourceTemplates => "resourceTemplates",
        }
    }

    /// The member of each item the policy decides on.
    pub fn key(self) -> &'static str {
        match self {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::ResourceTemplates => "uriTemplate",
        }
    }
}

/// Filters a JSON-RPC response body; `None` when it is not a list result we can read (then the
/// caller refuses to relay it rather than leak an unfiltered list).
pub fn filter_json(body: &[u8], kind: ListKind, keep: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
    let mut copy = body.to_vec();
    let mut value: OwnedValue = simd_json::to_owned_value(&mut copy).ok()?;
    if value.get("error").is_some() && value.get("result").is_none() {
        // An error answer lists nothing: relay it as it was.
        return Some(body.to_vec());
    }
    let items = value
        .get_mut("result")?
        .as_object_mut()?
        .get_mut(kind.field())?
        .as_array_mut()?;
    items.retain(|item| {
        item.get(kind.key())
            .and_then(|v| v.as_str())
            .is_some_and(keep)
    });
    Some(value.encode().into_bytes())
}

/// Filters an SSE body: each event whose data is the list result is rewritten.
pub fn filter_sse(body: &[u8], kind: ListKind, keep: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let (event, tail, sep) = match find_event_end(rest) {
            Some((end, sep_len)) => (
                &rest[..end],
                &rest[end + sep_len..],
                &rest[end..end + sep_len],
            ),
            None => (rest, "", ""),
        };
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| {
                l.strip_prefix("data:")
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
            })
            .collect();
        let joined = data.join("\n");
        let is_result =
            !data.is_empty() && joined.contains("\"result\"") && joined.contains(kind.field());
        if is_result {
            let filtered = filter_json(joined.as_bytes(), kind, keep)?;
            let filtered = std::str::from_utf8(&filtered).ok()?;
            let mut wrote_data = false;
            for line in event.lines() {
                if line.starts_with("data:") {
                    if !wrote_data {
                        out.push_str("data: ");
                        out.push_str(filtered);
                        out.push('\n');
                        wrote_data = true;
                    }
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            out.push_str(if sep.is_empty() { "" } else { "\n" });
        } else {
            out.push_str(event);
            out.push_str(sep);
        }
        rest = tail;
    }
    Some(out.into_bytes())
}

/// The end of the first event (index of its blank-line separator) and the separator's length.
fn find_event_end(s: &str) -> Option<(usize, usize)> {
    let lf = s.find("\n\n").map(|i| (i, 2));
    let crlf = s.find("\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"search_code","inputSchema":{}},{"name":"delete_repo","inputSchema":{}},{"name":"get_issue"}],"nextCursor":"page-2"}}"#;

    fn keep(name: &str) -> bool {
        !name.starts_with("delete")
    }

    #[test]
    fn filters_json_and_keeps_the_cursor() {
        let out = filter_json(LIST.as_bytes(), ListKind::Tools, &keep).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> = v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["search_code", "get_issue"]);
        assert_eq!(v["result"]["nextCursor"], "page-2");
        assert_eq!(v["id"], 2);
    }

    #[test]
    fn filters_sse_and_passes_other_events() {
        let body = format!(
            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{}}}}\n\nid: 7\nevent: message\ndata: {LIST}\n\n"
        );
        let out = String::from_utf8(filter_sse(body.as_bytes(), ListKind::Tools, &keep).unwrap())
            .unwrap();
        assert!(
            out.starts_with(
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\""
            ),
            "{out}"
        );
        assert!(out.contains("id: 7\nevent: message\ndata: "), "{out}");
        assert!(!out.contains("delete_repo"), "{out}");
        assert!(out.contains("get_issue"));
        assert!(out.ends_with("\n\n"));
    }

    #[test]
    fn errors_pass_and_garbage_is_refused() {
        let err = r#"{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"x"}}"#;
        assert_eq!(
            filter_json(err.as_bytes(), ListKind::Tools, &keep).unwrap(),
            err.as_bytes()
        );
        assert!(filter_json(b"{", ListKind::Tools, &keep).is_none());
        assert!(filter_json(br#"{"result":{"prompts":[]}}"#, ListKind::Tools, &keep).is_none());
    }

    #[test]
    fn resources_filter_on_uri() {
        let body = r#"{"jsonrpc":"2.0","id":1,"result":{"resources":[{"uri":"file:///srv/a","name":"a"},{"uri":"file:///etc/b","name":"b"}]}}"#;
        let out = filter_json(body.as_bytes(), ListKind::Resources, &|u| {
            u.starts_with("file:///srv/")
        })
        .unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("/etc/b"));
    }
}
