//! `scopegate audit verify DIR`: walks every worker's chain (rotated files in order, then the
//! current one) and names the first line that was changed, removed or reordered; checks each
//! chain against its head (a cut tail) and the manifest (a chain deleted whole, a head deleted).

use std::path::Path;

use super::chain::{self, chain_fields, hex, sha256};

#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub files: usize,
    pub entries: u64,
}

/// `Ok(report)` when every chain holds; `Err(message)` naming the first problem.
pub fn verify_dir(dir: &Path) -> Result<Report, String> {
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    let manifest = chain::read_manifest(dir)?;
    let on_disk = chain::workers_on_disk(dir);
    let Some(listed) = manifest else {
        return Err(if on_disk.is_empty() {
            format!("{}: no audit files (audit-w<N>.jsonl)", dir.display())
        } else {
            format!(
                "{}: {} is missing: which chains belong here cannot be told (deleted?)",
                dir.display(),
                chain::manifest_path(dir).display()
            )
        });
    };
    if let Some(w) = on_disk.iter().find(|w| !listed.contains(w)) {
        return Err(format!(
            "worker {w} has audit files but {} does not list it (the manifest was edited?)",
            chain::manifest_path(dir).display()
        ));
    }
    let mut report = Report {
        files: 0,
        entries: 0,
    };
    for &w in &listed {
        verify_chain(dir, w, &mut report)?;
    }
    Ok(report)
}

fn verify_chain(dir: &Path, w: usize, report: &mut Report) -> Result<(), String> {
    let Some(head) = chain::read_head(dir, w)? else {
        return Err(format!(
            "worker {w}: {} is missing (deleted?): the end of its chain cannot be checked",
            chain::head_path(dir, w).display()
        ));
    };
    let files = chain::chain_files(dir, w);
    if files.is_empty() && head.seq > 0 {
        return Err(format!(
            "worker {w}: its audit files are missing (deleted?); its head records {} entries",
            head.seq
        ));
    }
    let mut prev = [0u8; 32];
    let mut prev_seq: Option<u64> = None;
    let mut prev_place = String::new();
    let mut at_head: Option<[u8; 32]> = None;
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
            let (seq, claimed) = chain_fields(line)
                .ok_or_else(|| format!("{place}: not an audit entry (no seq/prev at its end)"))?;
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
            if let Some(detail) = chain::tamper_detail(line) {
                return Err(format!(
                    "{place}: when scopegate started it found this chain tampered with: {detail}"
                ));
            }
            if let Some(p) = prev_seq
                && seq != p + 1
            {
                return Err(format!(
                    "{place}: seq {seq} follows {p}: {} line(s) are missing or the sequence repeats",
                    seq.saturating_sub(p + 1)
                ));
            }
            prev = sha256(line);
            prev_seq = Some(seq);
            prev_place = place;
            if seq == head.seq {
                at_head = Some(prev);
            }
            report.entries += 1;
        }
    }
    // The head records the newest line written at the last flush: the chain must reach it and
    // hold that very line (lines after it are the few a crash may leave unrecorded).
    let last = prev_seq.unwrap_or(0);
    if head.seq > last {
        return Err(format!(
            "worker {w}: lines were removed from the end: {} records seq {}, the chain ends at seq {last}{}",
            chain::head_path(dir, w).display(),
            head.seq,
            if prev_place.is_empty() {
                String::new()
            } else {
                format!(" ({prev_place})")
            }
        ));
    }
    if let Some(hash) = at_head
        && hex(&hash) != head.hash
    {
        return Err(format!(
            "worker {w}: the line with seq {} is not the one {} recorded (changed?)",
            head.seq,
            chain::head_path(dir, w).display()
        ));
    }
    Ok(())
}
