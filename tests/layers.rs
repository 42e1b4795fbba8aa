//! The crate's dependencies point one way. Every file under `src/` is read for the modules it
//! names (`crate::…`, `super::…`, and its own child modules `x::…`, in `use` lines and inline
//! paths, comments and strings left out), and the test fails on
//! - a cycle: two files that import each other, directly or through others;
//! - an import against the layer table in `src/lib.rs` (a module may import only from layers
//!   below its own), or a top-level module missing from that table.
//!
//! The analysis is checked on small made-up trees first, so a broken reader cannot pass
//! vacuously.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module's path below the crate root: `["policy", "load"]` for `src/policy/load.rs`.
type Module = Vec<String>;

/// Source text with comments, strings and character literals blanked out (same length, so
/// offsets still line up).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = text[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b'r' | b'b' if raw_string_at(b, i).is_some() => {
                // A raw string: r"…", r#"…"#, br"…", br##"…"##.
                let (hashes, open) = raw_string_at(b, i).unwrap_or_default();
                let close = format!("\"{}", "#".repeat(hashes));
                let end = text[open + 1..]
                    .find(&close)
                    .map_or(b.len(), |p| open + 1 + p + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{..}'), or else a lifetime.
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|p| i + 2 + p + 1)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 3)
                } else {
                    None
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end);
                        i = end;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8")
}

/// At `i`, the start of a raw string (`r"`, `r#"`, `br"`, ...): the number of `#`s and where
/// its opening quote is.
fn raw_string_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if i > 0 && is_ident(b[i - 1]) {
        return None;
    }
    let r = if b[i] == b'b' { i + 1 } else { i };
    if b.get(r) != Some(&b'r') {
        return None;
    }
    let hashes = b[r + 1..].iter().take_while(|&&c| c == b'#').count();
    let open = r + 1 + hashes;
    (b.get(open) == Some(&b'"')).then_some((hashes, open))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The module paths a file names, each with the offset where it was named. `crate::{a, b::c}`
/// groups are expanded.
fn named_paths(code: &str, roots: &[String]) -> Vec<(usize, String, Vec<String>)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b'$')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let word = &code[start..i];
        // A path continues with `::` (not after `::`: `a::crate` is not a root).
        let after_colons = start >= 2 && &code[start - 2..start] == "::";
        if after_colons || !roots.iter().any(|r| r == word) || !code[i..].starts_with("::") {
            continue;
        }
        let (segments, end) = read_path(code, i);
        i = end;
        for path in segments {
            found.push((start, word.to_owned(), path));
        }
    }
    found
}

/// Reads `::a::b`, `::{a, b::{c, d}}` from `at`; returns every path and where reading stopped.
fn read_path(code: &str, mut at: usize) -> (Vec<Vec<String>>, usize) {
    let b = code.as_bytes();
    let mut prefix: Vec<String> = Vec::new();
    while code[at..].starts_with("::") {
        at += 2;
        while at < b.len() && b[at].is_ascii_whitespace() {
            at += 1;
        }
        if b.get(at) == Some(&b'{') {
            let mut depth = 0;
            let mut end = at;
            for (k, &c) in b[at..].iter().enumerate() {
                match c {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = at + k;
                    break;
                }
            }
            let mut paths = Vec::new();
            for item in split_top(&code[at + 1..end]) {
                let item = item.trim();
                let head: String = item.chars().take_while(|&c| is_ident(c as u8)).collect();
                if head.is_empty() {
                    continue;
                }
                let rest = &item[head.len()..];
                let mut base = prefix.clone();
                if head != "self" {
                    base.push(head.clone());
                }
                if rest.trim_start().starts_with("::") {
                    let offset = item.len() - rest.trim_start().len();
                    let (inner, _) = read_path(item, offset);
                    for p in inner {
                        paths.push(base.iter().cloned().chain(p).collect());
                    }
                } else {
                    paths.push(base);
                }
            }
            return (paths, end + 1);
        }
        let start = at;
        while at < b.len() && is_ident(b[at]) {
            at += 1;
        }
        if start == at {
            break;
        }
        prefix.push(code[start..at].to_owned());
    }
    (vec![prefix], at)
}

/// Splits a `{…}` group's inside at its top-level commas.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (k, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[from..k]);
                from = k + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[from..]);
    parts
}

/// `mod x;` declarations: the file's child modules.
fn children(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let mut line = line.trim();
            // `#[cfg(test)] mod x;`, `pub(in crate::a) mod x;`
            while line.starts_with("#[") {
                line = line[line.find(']')? + 1..].trim_start();
            }
            if let Some(rest) = line.strip_prefix("pub(") {
                line = rest[rest.find(')')? + 1..].trim_start();
            }
            let line = line.strip_prefix("pub ").unwrap_or(line);
            let name = line.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_owned())
        })
        .collect()
}

/// The deepest module of `modules` that `path` falls in; macros exported at the crate root
/// (`crate::warn!`) belong to `log`.
fn resolve(path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].to_vec())
        .find(|m| modules.contains(m))
        .or_else(|| {
            let first = path.first()?.as_str();
            matches!(first, "debug" | "info" | "warn" | "error" | "log_at")
                .then(|| vec!["log".to_owned()])
        })
}

/// Which modules each module (file) imports.
fn imports(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    read_imports(files).0
}

/// [`imports`], and every `crate::` path that names no module (a re-export at the crate root
/// would hide which layer a name comes from).
fn read_imports(
    files: &BTreeMap<Module, String>,
) -> (BTreeMap<Module, BTreeSet<Module>>, Vec<String>) {
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    let mut unresolved = Vec::new();
    for (module, text) in files {
        let code = code_only(text);
        // `super` inside the file's own `mod tests` is the file itself.
        let tests_at = code
            .match_indices("#[cfg(test)]")
            .map(|(at, _)| at)
            .find(|&at| {
                code[at..]
                    .trim_start_matches("#[cfg(test)]")
                    .trim_start()
                    .starts_with("mod tests")
            })
            .unwrap_or(code.len());
        let kids = children(&code);
        let mut roots = vec!["crate".to_owned(), "super".to_owned(), "self".to_owned()];
        roots.extend(kids.iter().cloned());
        let mut targets = BTreeSet::new();
        for (at, root, path) in named_paths(&code, &roots) {
            let full: Vec<String> = match root.as_str() {
                "crate" => {
                    if resolve(&path, &modules).is_none() {
                        unresolved.push(format!(
                            "{}: crate::{}",
                            module.join("::"),
                            path.join("::")
                        ));
                    }
                    path
                }
                // The file's own module (in its tests: the tests module, inside the file).
                "self" => module.iter().cloned().chain(path).collect(),
                "super" => {
                    let mut base = module.clone();
                    if at < tests_at {
                        base.pop();
                    }
                    let mut rest = path.as_slice();
                    while rest.first().map(String::as_str) == Some("super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                    base.into_iter().chain(rest.iter().cloned()).collect()
                }
                child => {
                    // A local variable or type named like a child module is not a path to
                    // it; `x::` right after `mod x;` is.
                    let mut p = module.clone();
                    p.push(child.to_owned());
                    p.extend(path);
                    p
                }
            };
            if let Some(target) = resolve(&full, &modules)
                && &target != module
            {
                targets.insert(target);
            }
        }
        edges.insert(module.clone(), targets);
    }
    (edges, unresolved)
}

/// A cycle in the import graph, if there is one.
fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        m: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        marks.insert(m.clone(), Mark::Open);
        stack.push(m.clone());
        for next in edges.get(m).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, edges, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(m.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in edges.keys() {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(m, edges, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// The layer table of `src/lib.rs`: module name → rank (0 is the bottom).
fn layer_table(lib: &str) -> BTreeMap<String, usize> {
    let doc: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let start = doc
        .iter()
        .position(|l| *l == "```text")
        .expect("a ```text layer table in src/lib.rs");
    let rows: Vec<&str> = doc[start + 1..]
        .iter()
        .take_while(|l| **l != "```")
        .copied()
        .collect();
    let mut table = BTreeMap::new();
    for (k, row) in rows.iter().enumerate() {
        // The names, then two or more spaces, then what the layer is.
        let names = row.split("  ").next().unwrap_or("");
        for name in names.split(',') {
            let name = name.trim();
            assert!(
                table.insert(name.to_owned(), rows.len() - 1 - k).is_none(),
                "{name} is in the layer table twice"
            );
        }
    }
    table
}

/// Every import between top-level modules that goes sideways or up.
fn layer_violations(
    edges: &BTreeMap<Module, BTreeSet<Module>>,
    table: &BTreeMap<String, usize>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (from, targets) in edges {
        for to in targets {
            let (a, b) = (&from[0], &to[0]);
            if a == b {
                continue;
            }
            match (table.get(a), table.get(b)) {
                (Some(ra), Some(rb)) if ra > rb => {}
                (Some(_), Some(_)) => out.push(format!(
                    "{} imports {}: {a} is not above {b} in the layer table",
                    from.join("::"),
                    to.join("::")
                )),
                _ => out.push(format!("{a} or {b} is missing from the layer table")),
            }
        }
    }
    out
}

fn read_tree(dir: &Path, prefix: &Module, files: &mut BTreeMap<Module, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            let mut p = prefix.clone();
            p.push(name);
            read_tree(&path, &p, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut module = prefix.clone();
            if name != "mod" {
                module.push(name);
            }
            files.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
}

fn crate_files() -> BTreeMap<Module, String> {
    let mut files = BTreeMap::new();
    read_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &Vec::new(),
        &mut files,
    );
    // The crate root and the binary: they sit above every layer.
    files.remove(&vec!["lib".to_owned()]);
    files.remove(&vec!["main".to_owned()]);
    files
}

fn tree(files: &[(&str, &str)]) -> BTreeMap<Module, String> {
    files
        .iter()
        .map(|(m, text)| {
            let module = m
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            (module, (*text).to_owned())
        })
        .collect()
}

fn m(path: &str) -> Module {
    path.split("::").map(str::to_owned).collect()
}

#[test]
fn the_reader_finds_imports_in_every_form_and_nothing_in_comments_or_strings() {
    let files = tree(&[
        (
            "a",
            "#[cfg(test)] pub(in crate::a) mod kid;\nuse crate::{b, c::{d, e as f}};\n// crate::g::x\n\
             /// [`crate::g`]\nfn x() { let s = \"crate::g\"; let r = r#\"crate::g\"#; let c = '\"';\n\
             let q = '\\''; let t = br#\"crate::g \\\"\"#; let u = br\"crate::g\"; kid::go(); }\n",
        ),
        (
            "a::kid",
            "pub fn go() { super::super::h::run(); crate::warn!(\"x\"); }\n",
        ),
        ("b", ""),
        ("c::d", ""),
        ("c::e", ""),
        ("g", ""),
        (
            "h",
            "#[cfg(test)]\npub fn helper() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n    \
             fn t() { super::run(); self::t(); }\n}\n",
        ),
        ("log", ""),
        ("m", "mod n;\nuse self::n::X;\n"),
        ("m::n", "pub struct X;\nfn y() { crate::Root::go(); }\n"),
    ]);
    let edges = imports(&files);
    assert_eq!(
        edges[&m("a")],
        BTreeSet::from([m("b"), m("c::d"), m("c::e"), m("a::kid")])
    );
    assert_eq!(edges[&m("a::kid")], BTreeSet::from([m("h"), m("log")]));
    assert!(edges[&m("h")].is_empty(), "super in h's tests is h itself");
    assert_eq!(
        edges[&m("m")],
        BTreeSet::from([m("m::n")]),
        "self:: paths count"
    );
    let (_, unresolved) = read_imports(&files);
    assert_eq!(unresolved, ["m::n: crate::Root::go"]);
}

#[test]
fn the_checks_catch_a_cycle_and_an_upward_import() {
    let files = tree(&[
        ("low", "pub fn f() { crate::high::g(); }\n"),
        ("high", "use crate::low::f;\n"),
        ("room", "mod part;\nuse part::X;\npub struct Y;\n"),
        (
            "room::part",
            "use super::Y;\npub struct X;\nfn z() { crate::low::f(); }\n",
        ),
    ]);
    let edges = imports(&files);
    let cycle = find_cycle(&edges).expect("low <-> high is a cycle");
    assert!(cycle.len() >= 3, "{cycle:?}");
    let table = layer_table("//! ```text\n//! high    top\n//! low     bottom\n//! ```\n");
    let violations = layer_violations(&edges, &table);
    assert!(
        violations.iter().any(|v| v.starts_with("low imports high")),
        "{violations:?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v.contains("room or low is missing")),
        "{violations:?}"
    );
    // A parent and its child that import each other are a cycle too.
    let room: BTreeMap<_, _> = edges.into_iter().filter(|(k, _)| k[0] == "room").collect();
    assert!(find_cycle(&room).is_some());
}

#[test]
fn no_two_modules_import_each_other() {
    let edges = imports(&crate_files());
    // The reader sees the crate's real structure (not an empty graph).
    assert!(edges[&m("serve::onward")].contains(&m("forward")));
    assert!(edges[&m("forward")].contains(&m("upstream::exchange")));
    if let Some(cycle) = find_cycle(&edges) {
        let names: Vec<String> = cycle.iter().map(|c| c.join("::")).collect();
        panic!("import cycle: {}", names.join(" -> "));
    }
}

#[test]
fn imports_point_down_the_layer_table() {
    let files = crate_files();
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let table = layer_table(&lib);
    let top: BTreeSet<&str> = files.keys().map(|k| k[0].as_str()).collect();
    for t in &top {
        assert!(
            table.contains_key(*t),
            "src/{t} is missing from the layer table in src/lib.rs"
        );
    }
    for name in table.keys() {
        assert!(
            top.contains(name.as_str()),
            "the layer table names {name}, which is not a module"
        );
    }
    let (edges, unresolved) = read_imports(&files);
    assert!(
        unresolved.is_empty(),
        "paths through the crate root hide their layer: {unresolved:?}"
    );
    let violations = layer_violations(&edges, &table);
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
