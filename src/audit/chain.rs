//! The audit log's layout on disk, in one place: what the writer makes and `audit verify`
//! checks.
//!
//! - `audit-w<N>.jsonl` (and rotated `audit-w<N>.<n>.jsonl`): worker N's chain. Every line ends
//!   with `,"seq":<n>,"prev":"<hex SHA-256 of the previous line>"}`, written last, so a line's
//!   own fields are read from its end whatever its arguments hold.
//! - `audit-w<N>.head`: the seq and hash of the newest line written, so cutting a file's tail
//!   shows (the head is rewritten after each flush; lines newer than it are the ones a crash
//!   may leave unrecorded).
//! - `audit.manifest`: every worker that ever wrote in this directory, so a chain deleted whole
//!   (its files and its head) is missed, not silently absent.
//! - A line `{"ts":..,"worker":N,"audit":"tamper","detail":..}` in a chain: the writer found,
//!   when it started, that the log had been cut or deleted; it records that in the chain itself
//!   (and continues the sequence past what was lost), so the evidence outlives the restart.

use std::path::{Path, PathBuf};

use crate::fmt::{push_decimal, push_hex};

/// `audit-w<worker>.jsonl`, the file being written.
pub fn current_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("audit-w{worker}.jsonl"))
}

/// `audit-w<worker>.<n>.jsonl`, a rotated file (n from 1, in order).
pub fn rotated_path(dir: &Path, worker: usize, n: u64) -> PathBuf {
    dir.join(format!("audit-w{worker}.{n:06}.jsonl"))
}

/// `audit-w<worker>.head`.
pub fn head_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("audit-w{worker}.head"))
}

/// `audit.manifest`.
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("audit.manifest")
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The rotated files of `worker` in `dir`, by number.
pub fn rotated_files(dir: &Path, worker: usize) -> Vec<(u64, PathBuf)> {
    let prefix = format!("audit-w{worker}.");
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(&prefix)?.strip_suffix(".jsonl")?;
            Some((n.parse().ok()?, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every file of worker `worker`'s chain, oldest first.
pub fn chain_files(dir: &Path, worker: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated_files(dir, worker)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let current = current_path(dir, worker);
    if current.exists() {
        files.push(current);
    }
    files
}

/// The workers that have chain files or heads in `dir`.
pub fn workers_on_disk(dir: &Path) -> Vec<usize> {
    let mut workers: Vec<usize> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("audit-w")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = &rest[digits.len()..];
            let ours = (after.starts_with('.') && after.ends_with(".jsonl")) || after == ".head";
            ours.then(|| digits.parse().ok())?
        })
        .collect();
    workers.sort_unstable();
    workers.dedup();
    workers
}

/// Appends one finished line to `batch`: the encoded entry, its `seq`, the hash of the previous
/// line, and a newline. Returns this line's hash (without the newline), the next line's `prev`.
pub fn chain_line(batch: &mut Vec<u8>, record: &[u8], seq: u64, prev: &[u8; 32]) -> [u8; 32] {
    let start = batch.len();
    batch.extend_from_slice(record);
    batch.extend_from_slice(b",\"seq\":");
    push_decimal(batch, seq);
    batch.extend_from_slice(b",\"prev\":\"");
    push_hex(prev, batch);
    batch.extend_from_slice(b"\"}");
    let hash = sha256(&batch[start..]);
    batch.push(b'\n');
    hash
}

/// A line's own `seq` and `prev`, read from its end (where [`chain_line`] wrote them), so
/// nothing earlier in the line (an argument named `seq`) can be taken for them.
pub fn chain_fields(line: &[u8]) -> Option<(u64, &str)> {
    let body = line.strip_suffix(b"\"}")?;
    if body.len() < 64 {
        return None;
    }
    let (rest, prev) = body.split_at(body.len() - 64);
    let prev = std::str::from_utf8(prev).ok()?;
    if !prev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rest = rest.strip_suffix(b",\"prev\":\"")?;
    let digits_at = rest
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let digits = &rest[digits_at..];
    if digits.is_empty() || digits.len() > 20 || !rest[..digits_at].ends_with(b",\"seq\":") {
        return None;
    }
    let seq = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((seq, prev))
}

/// The record of a chain found cut or deleted at start (without its closing `,"seq"..}`).
pub fn tamper_record(worker: usize, detail: &str) -> Vec<u8> {
    let mut ts = String::new();
    crate::log::rfc3339_micros(std::time::SystemTime::now(), &mut ts);
    let mut out = Vec::with_capacity(128 + detail.len());
    out.extend_from_slice(b"{\"ts\":\"");
    out.extend_from_slice(ts.as_bytes());
    out.extend_from_slice(b"\",\"worker\":");
    push_decimal(&mut out, worker as u64);
    out.extend_from_slice(TAMPER_MARK);
    out.extend_from_slice(b",\"detail\":");
    crate::mcp::jsonrpc::write_json_string(detail, &mut out);
    out
}

/// What follows `"worker":N` in a tamper record (an entry has `,"http":` there).
const TAMPER_MARK: &[u8] = b",\"audit\":\"tamper\"";

/// The detail of a tamper record, when `line` is one.
pub fn tamper_detail(line: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(line.get(..64)?, b",\"worker\":")? + 10;
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if !line[at + digits..].starts_with(TAMPER_MARK) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    Some(v.get("detail")?.as_str()?.to_owned())
}

/// What a head file records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadRecord {
    pub seq: u64,
    pub hash: String,
}

/// Records the newest line's seq and hash (atomically: a temporary file renamed over the head).
/// With `sync` the head reaches the disk before the rename, after the lines it names were
/// synced, so after a power loss a head never runs ahead of its chain.
pub fn write_head(dir: &Path, worker: usize, seq: u64, hash: &[u8; 32], sync: bool) {
    use std::io::Write as _;
    let path = head_path(dir, worker);
    let tmp = path.with_extension("head.tmp");
    let text = format!("{{\"seq\":{seq},\"hash\":\"{}\"}}\n", hex(hash));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    });
    if written.is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// The head of `worker`: `Ok(None)` when there is no head file, `Err` when it is unreadable.
pub fn read_head(dir: &Path, worker: usize) -> Result<Option<HeadRecord>, String> {
    let path = head_path(dir, worker);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let bad = || format!("{}: not a head record", path.display());
    let seq = text
        .split("\"seq\":")
        .nth(1)
        .and_then(|s| {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            s[..end].parse().ok()
        })
        .ok_or_else(bad)?;
    let hash = text
        .split("\"hash\":\"")
        .nth(1)
        .and_then(|s| s.get(..64))
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(bad)?
        .to_owned();
    Ok(Some(HeadRecord { seq, hash }))
}

/// The workers the manifest lists (`Ok(None)`: no manifest).
pub fn read_manifest(dir: &Path) -> Result<Option<Vec<usize>>, String> {
    let path = manifest_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let list = text
        .split("\"workers\":[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .ok_or_else(|| format!("{}: not a manifest", path.display()))?;
    let mut workers = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        workers.push(
            item.parse()
                .map_err(|_| format!("{}: not a manifest", path.display()))?,
        );
    }
    Ok(Some(workers))
}

/// Records that workers `0..threads` write in `dir`, keeping the workers of earlier runs (a
/// restart with fewer threads must not make their chains look optional). Returns the workers
/// the manifest listed before.
pub fn update_manifest(dir: &Path, threads: usize) -> std::io::Result<Vec<usize>> {
    std::fs::create_dir_all(dir)?;
    let before = read_manifest(dir)
        .map_err(std::io::Error::other)?
        .unwrap_or_default();
    let mut workers = before.clone();
    workers.extend(0..threads);
    workers.sort_unstable();
    workers.dedup();
    let list: Vec<String> = workers.iter().map(usize::to_string).collect();
    let path = manifest_path(dir);
    let tmp = path.with_extension("manifest.tmp");
    std::fs::write(&tmp, format!("{{\"workers\":[{}]}}\n", list.join(",")))?;
    std::fs::rename(&tmp, &path)?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_s_own_fields_are_read_from_its_end() {
        let mut batch = Vec::new();
        let record = br#"{"ts":"t","args":{"seq":7,"prev":"x","s":",\"seq\":9,\"prev\":\"00\"}"#;
        chain_line(&mut batch, record, 42, &[0xab; 32]);
        let line = batch.strip_suffix(b"\n").unwrap();
        let (seq, prev) = chain_fields(line).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(prev, hex(&[0xab; 32]));
        assert!(chain_fields(b"{\"seq\":1}").is_none());
        assert!(chain_fields(b"").is_none());
    }
}
