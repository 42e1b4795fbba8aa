//! `scopegate audit verify DIR`: walks every worker's chain (rotated files in order, then the
//! current one) and names the first line that was changed, removed or reordered.

use std::path::{Path, PathBuf};

use super::writer::{current_path, head_path, hex, rotated_files, sha256};

#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub files: usize,
    pub entries: u64,
}

/// `Ok(report)` when every chain holds; `Err(message)` naming the first broken line.
pub fn verify_dir(dir: &Path) -> Result<Report, String> {
    let mut workers: Vec<usize> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("audit-w")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let after = &rest[digits.len()..];
            (after.starts_with('.') && after.ends_with(".jsonl")).then(|| digits.parse().ok())?
        })
        .collect();
    workers.sort_unstable();
    workers.dedup();
    if workers.is_empty() {
        return Err(format!(
            "{}: no audit files (audit-w<N>.jsonl)",
            dir.display()
        ));
    }
    let mut report = Report {
        files: 0,
        entries: 0,
    };
    for w in workers {
        let mut files: Vec<PathBuf> = rotated_files(dir, w).into_iter().map(|(_, p)| p).collect();
        let current = current_path(dir, w);
        if current.exists() {
            files.push(current);
        }
        let mut prev = [0u8; 32];
        let mut prev_seq: Option<u64> = None;
        let mut prev_place = String::new();
        for file in &files {
            report.files += 1;
            let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            if !text.is_empty() && !text.ends_with(b"\n") {
                return Err(format!(
                    "{}: the last line is torn (no newline)",
                    file.display()
                ));
            }
            let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            if lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop(); // what follows the final newline
            }
            for (i, line) in lines.into_iter().enumerate() {
                let place = format!("{}:{}", file.display(), i + 1);
                let (claimed, seq) = fields(line)
                    .ok_or_else(|| format!("{place}: not an audit entry (no prev/seq)"))?;
                if claimed != hex(&prev) {
                    let what = match prev_seq {
                        None => "the first line does not start a chain (an earlier file or line was removed, or this line was changed)".to_string(),
                        Some(p) if seq == p + 1 => format!("line {prev_place} was changed (its hash does not match what this line recorded)"),
                        Some(p) if seq > p + 1 => format!("{} line(s) were removed between {prev_place} and this line", seq - p - 1),
                        Some(p) if seq <= p => "lines were reordered (this line is out of sequence)".to_string(),
                        Some(_) => format!("line {prev_place} was changed, or lines were removed or reordered before this one"),
                    };
                    return Err(format!("{place}: chain broken: {what}"));
                }
                if let Some(p) = prev_seq
                    && seq != p + 1
                {
                    return Err(format!(
                        "{place}: seq {seq} follows {p}: the sequence has a gap or repeats"
                    ));
                }
                prev = sha256(line);
                prev_seq = Some(seq);
                prev_place = place;
                report.entries += 1;
            }
        }
        // The head file records the newest line: truncating a file's tail is caught here.
        if let Ok(head) = std::fs::read_to_string(head_path(dir, w))
            && let Some(hash) = head.split("\"hash\":\"").nth(1).and_then(|s| s.get(..64))
            && hash != hex(&prev)
        {
            return Err(format!(
                "worker {w}: the newest line does not match audit-w{w}.head: lines were removed from the end{}",
                if prev_place.is_empty() {
                    String::new()
                } else {
                    format!(" (after {prev_place})")
                }
            ));
        }
    }
    Ok(report)
}

/// The `prev` hash and `seq` of a line.
fn fields(line: &[u8]) -> Option<(String, u64)> {
    let p = memchr::memmem::rfind(line, b"\"prev\":\"")? + 8;
    let prev = std::str::from_utf8(line.get(p..p + 64)?).ok()?.to_owned();
    let s = memchr::memmem::find(line, b"\"seq\":")? + 6;
    let end = line[s..]
        .iter()
        .position(|b| !b.is_ascii_digit())
        .map_or(line.len(), |n| s + n);
    let seq = std::str::from_utf8(&line[s..end]).ok()?.parse().ok()?;
    Some((prev, seq))
}
