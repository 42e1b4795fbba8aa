//! Discovery filtering: rewrite `tools/list`, `prompts/list`, `resources/list` and
//! `resources/templates/list` results so they hold only what the agent may use. Works on a JSON
//! body or on an SSE body (each event's data is checked; the one carrying the result is
//! rewritten, the others pass unchanged). Everything else in the result (`nextCursor`, `_meta`)
//! is kept, so pagination works page by page.

use serde_json::Value;

use super::tape::fold_eq;

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

    /// The server capability ([`super::caps`]) that offers this kind.
    pub fn capability(self) -> u8 {
        match self {
            ListKind::Tools => super::caps::TOOLS,
            ListKind::Prompts => super::caps::PROMPTS,
            ListKind::Resources | ListKind::ResourceTemplates => super::caps::RESOURCES,
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

/// Whether an agent may see a listed item (by its name or URI, which the item is known to
/// have), given the item itself: the check may also rewrite the agent's copy (the operator's
/// description of a tool).
pub type Visible<'a> = &'a dyn Fn(ListKind, &mut Value) -> bool;

/// Why a body could not be filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// Filters every list result in a JSON-RPC message or batch: each `result` holding `tools`,
/// `prompts`, `resources` or `resourceTemplates` keeps only the items `visible` allows (an item
/// without a readable name or URI is dropped). `Ok(None)`: the body holds no list and is relayed
/// as it is; `Ok(Some(bytes))`: the body re-written (always, when it holds a list, so duplicate
/// keys cannot smuggle a second, unfiltered copy); `Err`: not JSON, and the caller must not
/// relay it unfiltered.
pub fn filter_lists(body: &[u8], visible: Visible<'_>) -> Result<Option<Vec<u8>>, Unreadable> {
    let mut value: Value = serde_json::from_slice(body).map_err(|_| Unreadable)?;
    let found = match value.as_array_mut() {
        Some(batch) => batch
            .iter_mut()
            .fold(false, |found, m| filter_message(m, visible) | found),
        None => filter_message(&mut value, visible),
    };
    Ok(found.then(|| serde_json::to_vec(&value).unwrap_or_default()))
}

/// Filters the lists of one message's result; true when it had any.
fn filter_message(message: &mut Value, visible: Visible<'_>) -> bool {
    // Keys alike but for letter case are one key to some parsers ([`super::tape`]): a variant of
    // `result`, or of a list field, would carry an unfiltered copy past the filter. Dropped.
    // Anything dropped counts as found: the body is then re-written, never relayed as it came.
    let variant = |key: &str, of: &str| key != of && fold_eq(key, of);
    let mut dropped = false;
    if let Some(m) = message.as_object_mut() {
        let before = m.len();
        m.retain(|k, _| !variant(k, "result"));
        dropped = m.len() != before;
    }
    let Some(result) = message.get_mut("result").and_then(|r| r.as_object_mut()) else {
        return dropped;
    };
    let kinds = [
        ListKind::Tools,
        ListKind::Prompts,
        ListKind::Resources,
        ListKind::ResourceTemplates,
    ];
    let before = result.len();
    result.retain(|k, _| !kinds.iter().any(|kind| variant(k, kind.field())));
    let mut found = dropped || result.len() != before;
    for kind in kinds {
        let Some(items) = result.get_mut(kind.field()) else {
            continue;
        };
        found = true;
        match items.as_array_mut() {
            Some(items) => items.retain_mut(|item| {
                item.get(kind.key()).is_some_and(Value::is_string) && visible(kind, item)
            }),
            // Not a list where a list belongs: nothing of it is relayed.
            None => *items = Value::Array(Vec::new()),
        }
    }
    // A list filtered for one agent must not be cached for others (2026-07-28 caching hints).
    if found && result.contains_key("cacheScope") {
        result.insert("cacheScope".into(), Value::from("private"));
    }
    found
}

/// The name (or URI) a listed item is known by.
pub fn item_name(kind: ListKind, item: &Value) -> Option<&str> {
    item.get(kind.key()).and_then(Value::as_str)
}

/// Whether an event-stream event or a body may hold a list result and must be looked at: it
/// names `"result"` and a list member, or it has an escaped ASCII character (`"tool\u0073"`
/// is `"tools"` once parsed). A cheap scan; the parse happens only when it says yes.
pub fn may_hold_list(data: &[u8]) -> bool {
    use memchr::memmem::find;
    // An escaped ASCII character (`\u0073`) could spell a key; escaped non-ASCII (what
    // `json.dumps` writes for "é") cannot.
    let mut from = 0;
    while let Some(i) = find(&data[from..], b"\\u00") {
        let at = from + i + 4;
        if data.get(at).is_some_and(|b| (b'2'..=b'7').contains(b)) {
            return true;
        }
        from = at;
    }
    // Letters some parsers fold into ASCII ones (`ſ` reads as s, the Kelvin sign as k), written
    // or escaped: rare, so looked at whole.
    if ["\u{17f}", "\u{212a}"]
        .iter()
        .any(|c| find(data, c.as_bytes()).is_some())
        || [b"\\u017f", b"\\u017F", b"\\u212a", b"\\u212A"]
            .iter()
            .any(|e| find(data, *e).is_some())
    {
        return true;
    }
    // The keys in any letter case: a case-blind parser reads `"Tools"` as `"tools"`.
    let (mut result, mut list) = (false, false);
    for i in memchr::memchr_iter(b'"', data) {
        let rest = &data[i + 1..];
        let is = |word: &[u8]| {
            rest.len() > word.len()
                && rest[word.len()] == b'"'
                && rest[..word.len()].eq_ignore_ascii_case(word)
        };
        result |= is(b"result");
        list |= is(b"tools") || is(b"prompts") || is(b"resources") || is(b"resourcetemplates");
        if result && list {
            return true;
        }
    }
    false
}

/// How long a list result may be shared across agents, by its 2026-07-28 caching hints:
/// `Some` only for `cacheScope: "public"` with a `ttlMs` above 0.
pub fn shared_for(result: &serde_json::Value) -> Option<std::time::Duration> {
    let public = result.get("cacheScope").and_then(|v| v.as_str()) == Some("public");
    let ttl = result.get("ttlMs").and_then(|v| v.as_u64()).unwrap_or(0);
    (public && ttl > 0).then(|| std::time::Duration::from_millis(ttl))
}

/// Whether an upstream message (or event) may be a list-change notification (a quick look at
/// the bytes: a false positive only ends cached lists early).
pub fn is_list_changed(message: &[u8]) -> bool {
    memchr::memmem::find(message, b"/list_changed").is_some()
}

/// The list-change notifications, each with the `subscriptions/listen` filter flag that asks
/// for it (2026-07-28).
pub const LIST_CHANGED: [(&str, &str); 3] = [
    ("toolsListChanged", "notifications/tools/list_changed"),
    ("promptsListChanged", "notifications/prompts/list_changed"),
    (
        "resourcesListChanged",
        "notifications/resources/list_changed",
    ),
];

/// Where a `subscriptions/listen` stream's frames carry its id (the listen request's id).
pub const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// The list-change notifications a `subscriptions/listen` filter asks for.
pub fn list_changes_asked(filter: &serde_json::Value) -> Vec<&'static str> {
    LIST_CHANGED
        .iter()
        .filter(|(flag, _)| filter.get(flag).and_then(|v| v.as_bool()) == Some(true))
        .map(|(_, m)| *m)
        .collect()
}

/// The `_meta` of a subscription's frames, for the listen request whose id is `id` (JSON).
pub fn subscription_meta(id: &[u8]) -> String {
    let mut meta = format!("{{\"{SUBSCRIPTION_ID}\":");
    meta.push_str(&String::from_utf8_lossy(id));
    meta.push('}');
    meta
}

/// SSE events telling an agent that its lists changed: one per method in `methods`, each
/// carrying `meta` (a subscription's `_meta`, as JSON) when given.
pub fn list_changed_events(methods: &[&str], meta: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    for method in methods {
        out.extend_from_slice(b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"");
        out.extend_from_slice(method.as_bytes());
        out.push(b'"');
        if let Some(meta) = meta {
            out.extend_from_slice(b",\"params\":{\"_meta\":");
            out.extend_from_slice(meta.as_bytes());
            out.push(b'}');
        }
        out.extend_from_slice(b"}\n\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"search_code","inputSchema":{}},{"name":"delete_repo","inputSchema":{}},{"name":"get_issue"}],"nextCursor":"page-2"}}"#;

    fn keep(kind: ListKind, item: &mut Value) -> bool {
        let name = item_name(kind, item).unwrap();
        !name.starts_with("delete") && !name.contains("/etc/")
    }

    fn names(v: &serde_json::Value, field: &str, key: &str) -> Vec<String> {
        v["result"][field]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[key].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn case_variants_of_list_keys_are_looked_at_and_dropped() {
        let visible = |_: ListKind, item: &mut Value| item["name"] != "delete_repo";
        // Only a variant: a case-blind client would read it as the list.
        let body = r#"{"jsonrpc":"2.0","id":2,"Result":{"Tools":[{"name":"delete_repo"}]},"result":{"tools":[],"TOOLS":[{"name":"delete_repo"}],"toolſ":[{"name":"delete_repo"}]}}"#.as_bytes();
        assert!(may_hold_list(br#"{"id":2,"RESULT":{"Tools":[]}}"#));
        assert!(may_hold_list(body));
        let out = filter_lists(body, &visible).unwrap().unwrap();
        assert!(
            !String::from_utf8_lossy(&out).contains("delete_repo"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        // Only a variant, no exact key anywhere: re-written all the same.
        let only = br#"{"jsonrpc":"2.0","id":2,"result":{"Tools":[{"name":"delete_repo"}]}}"#;
        let out = filter_lists(only, &visible).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("delete_repo"));
        // Not a list at all: still relayed as it is.
        assert!(!may_hold_list(br#"{"id":2,"result":{"content":[]}}"#));
    }

    #[test]
    fn filters_and_keeps_the_cursor() {
        let out = filter_lists(LIST.as_bytes(), &keep).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(names(&v, "tools", "name"), ["search_code", "get_issue"]);
        assert_eq!(v["result"]["nextCursor"], "page-2");
        assert_eq!(v["id"], 2);
    }

    #[test]
    fn filters_every_answer_of_a_batch() {
        let body = format!(
            r#"[{LIST},{{"jsonrpc":"2.0","id":3,"result":{{"resources":[{{"uri":"file:///etc/x"}},{{"uri":"file:///srv/a"}}]}}}},{{"jsonrpc":"2.0","id":4,"result":{{"content":[]}}}}]"#
        );
        let out = filter_lists(body.as_bytes(), &keep).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(names(&v[0], "tools", "name"), ["search_code", "get_issue"]);
        assert_eq!(names(&v[1], "resources", "uri"), ["file:///srv/a"]);
        assert_eq!(v[2]["result"]["content"], serde_json::json!([]));
    }

    #[test]
    fn bodies_without_lists_pass_and_garbage_is_refused() {
        let err = r#"{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"x"}}"#;
        assert_eq!(filter_lists(err.as_bytes(), &keep), Ok(None));
        let call =
            r#"{"jsonrpc":"2.0","id":2,"result":{"content":[{"type":"text","text":"\"tools\""}]}}"#;
        assert_eq!(filter_lists(call.as_bytes(), &keep), Ok(None));
        assert_eq!(filter_lists(b"{", &keep), Err(Unreadable));
        // A list member that is not a list is emptied, items without a name dropped.
        let odd = br#"{"result":{"tools":{"name":"delete_repo"},"prompts":[{"title":"x"},{"name":"p"}]}}"#;
        let v: serde_json::Value =
            serde_json::from_slice(&filter_lists(odd, &keep).unwrap().unwrap()).unwrap();
        assert_eq!(v["result"]["tools"], serde_json::json!([]));
        assert_eq!(names(&v, "prompts", "name"), ["p"]);
    }

    #[test]
    fn escaped_and_duplicated_keys_cannot_smuggle_a_list() {
        let escaped =
            br#"{"jsonrpc":"2.0","id":1,"r\u0065sult":{"tool\u0073":[{"name":"delete_repo"}]}}"#;
        assert!(may_hold_list(escaped));
        let v: serde_json::Value =
            serde_json::from_slice(&filter_lists(escaped, &keep).unwrap().unwrap()).unwrap();
        assert_eq!(v["result"]["tools"], serde_json::json!([]));
        let dup = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"delete_repo"}],"tools":[{"name":"ok"}]}}"#;
        let out = filter_lists(dup, &keep).unwrap().unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("delete_repo"));
        assert!(!may_hold_list(
            br#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#
        ));
        assert!(!may_hold_list(
            br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"text":"caf\u00e9"}]}}"#
        ));
    }

    #[test]
    fn a_rewritten_list_keeps_the_upstreams_member_order() {
        let body = br#"{"result":{"tools":[{"name":"a","inputSchema":{"type":"object","properties":{"zeta":{},"alpha":{}}}}]},"jsonrpc":"2.0","id":1}"#;
        let out = filter_lists(body, &keep).unwrap().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.find("zeta") < text.find("alpha"), "{text}");
        assert!(text.starts_with(r#"{"result""#), "{text}");
    }

    #[test]
    fn a_filtered_list_is_never_cached_for_others() {
        let body = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"}],"ttlMs":60000,"cacheScope":"public"}}"#;
        let v: serde_json::Value =
            serde_json::from_slice(&filter_lists(body, &keep).unwrap().unwrap()).unwrap();
        assert_eq!(v["result"]["cacheScope"], "private");
        assert_eq!(v["result"]["ttlMs"], 60000);
    }
}
