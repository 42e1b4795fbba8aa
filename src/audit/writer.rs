//! The audit writer: one thread per worker, draining that worker's ring into its own JSON Lines
//! file. Each line ends with `"prev":"<hex SHA-256 of the previous line>"`, a chain that
//! continues across rotation and restarts. A batch is written with one `write`; on error the
//! batch is kept (its chain already computed) and retried, so nothing is lost or reordered.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use super::ring::ByteRing;
use crate::fmt::{push_decimal, push_hex};
use crate::{error, info, warn};

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub flush: Duration,
    pub max_file_bytes: u64,
    pub fsync: bool,
    pub fail_closed: bool,
    pub ring_bytes: usize,
    pub max_args: usize,
}

/// State shared by a worker (producer) and its writer (consumer).
pub struct Channel {
    pub ring: ByteRing,
    /// The last write failed and has not succeeded since.
    pub failing: AtomicBool,
    pub write_errors: AtomicU64,
    pub written: AtomicU64,
    pub stop: AtomicBool,
    writer: OnceLock<Thread>,
}

impl Channel {
    pub fn new(ring_bytes: usize) -> Channel {
        Channel {
            ring: ByteRing::new(ring_bytes),
            failing: AtomicBool::new(false),
            write_errors: AtomicU64::new(0),
            written: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            writer: OnceLock::new(),
        }
    }

    /// Asks the writer to flush now.
    pub fn wake(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

/// `audit-w<worker>.jsonl`, the file being written.
pub fn current_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("audit-w{worker}.jsonl"))
}

/// `audit-w<worker>.<n>.jsonl`, a rotated file (n from 1, in order).
pub fn rotated_path(dir: &Path, worker: usize, n: u64) -> PathBuf {
    dir.join(format!("audit-w{worker}.{n:06}.jsonl"))
}

/// `audit-w<worker>.head`: the hash and seq of the last line written, so truncation of a
/// file's tail is detectable too.
pub fn head_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("audit-w{worker}.head"))
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

struct Sink {
    dir: PathBuf,
    worker: usize,
    file: Option<File>,
    size: u64,
    prev: [u8; 32],
    /// The seq of the last line on disk.
    last_seq: u64,
    /// The seq of the last line put in a batch (ahead of `last_seq` while a batch is pending).
    next_seq: u64,
    next_rotation: u64,
}

impl Sink {
    fn open(dir: &Path, worker: usize) -> std::io::Result<Sink> {
        std::fs::create_dir_all(dir)?;
        let rotated = rotated_files(dir, worker);
        let next_rotation = rotated.last().map_or(1, |(n, _)| n + 1);
        let current = current_path(dir, worker);
        // Continue the chain from the newest line on disk.
        let mut prev = [0u8; 32];
        let mut last_seq = 0;
        let candidates = [
            Some(current.clone()),
            rotated.last().map(|(_, p)| p.clone()),
        ];
        for path in candidates.into_iter().flatten() {
            if let Some(line) = last_line(&path)? {
                prev = sha256(&line);
                last_seq = seq_of(&line).unwrap_or(0);
                break;
            }
        }
        let mut sink = Sink {
            dir: dir.to_owned(),
            worker,
            file: None,
            size: 0,
            prev,
            last_seq,
            next_seq: last_seq,
            next_rotation,
        };
        sink.reopen()?;
        Ok(sink)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let path = current_path(&self.dir, self.worker);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = Some(file);
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let from = current_path(&self.dir, self.worker);
        let to = rotated_path(&self.dir, self.worker, self.next_rotation);
        self.file = None;
        std::fs::rename(&from, &to)?;
        self.next_rotation += 1;
        info!("audit: rotated {} -> {}", from.display(), to.display());
        self.reopen()
    }
}

/// The last complete line of a regular file (a torn last line, from a crash while the disk was
/// full, is cut off so the chain continues from the last whole line).
fn last_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let mut f = File::open(path)?;
    let window = meta.len().min(4 * 1024 * 1024);
    f.seek(SeekFrom::Start(meta.len() - window))?;
    let mut buf = Vec::with_capacity(window as usize);
    f.read_to_end(&mut buf)?;
    let complete = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i,
        None => return Ok(None),
    };
    if complete + 1 < buf.len() {
        warn!(
            "audit: {} ends in a torn line; it is cut off",
            path.display()
        );
        let keep = meta.len() - (buf.len() - complete - 1) as u64;
        OpenOptions::new().write(true).open(path)?.set_len(keep)?;
    }
    let start = buf[..complete]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Ok(Some(buf[start..complete].to_vec()))
}

fn seq_of(line: &[u8]) -> Option<u64> {
    let i = memchr::memmem::find(line, b"\"seq\":")? + 6;
    let digits: &[u8] = &line[i..line[i..]
        .iter()
        .position(|b| !b.is_ascii_digit())
        .map_or(line.len(), |n| i + n)];
    std::str::from_utf8(digits).ok()?.parse().ok()
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

/// Starts worker `worker`'s writer thread.
pub fn spawn(
    worker: usize,
    config: AuditConfig,
    channel: Arc<Channel>,
) -> std::io::Result<JoinHandle<()>> {
    let mut sink = Sink::open(&config.dir, worker)?;
    let handle = std::thread::Builder::new()
        .name(format!("scopegate-audit{worker}"))
        .spawn({
            let channel = channel.clone();
            move || {
                // Thread-per-core: a worker's writer runs on the worker's core, so its hashing
                // and writes use that core's idle time and its cache, not another core's.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let _ = monoio::utils::bind_to_cpu_set([worker % cores]);
                run(&config, &channel, &mut sink)
            }
        })?;
    let _ = channel.writer.set(handle.thread().clone());
    Ok(handle)
}

/// The most a batch holds before it is written: the writer hashes and writes in slices of
/// this size and yields its core between them, so the worker it shares the core with waits for
/// at most one slice (a fraction of a millisecond), not for a whole flush.
const SLICE: usize = 256 * 1024;

fn run(config: &AuditConfig, channel: &Channel, sink: &mut Sink) {
    let mut batch: Vec<u8> = Vec::with_capacity(SLICE + 64 * 1024);
    let mut batch_lines = 0u64;
    let mut batch_last_seq = 0u64;
    let mut written = 0usize;
    let mut wrote_since_head = false;
    // Whether the last slice was full (more was waiting when it was taken).
    let mut slice_full = false;
    let mut last_error_log = Instant::now() - Duration::from_secs(60);
    loop {
        let stopping = channel.stop.load(Ordering::Acquire);
        if batch.is_empty() {
            let before = batch.len();
            channel.ring.drain_up_to(SLICE, |record| {
                sink.next_seq += 1;
                sink.prev = chain_line(&mut batch, record, sink.next_seq, &sink.prev);
                batch_last_seq = sink.next_seq;
                batch_lines += 1;
            });
            slice_full = batch.len() - before >= SLICE;
            written = 0;
        }
        if !batch.is_empty() {
            match write_batch(config, sink, &batch, &mut written) {
                Ok(()) => {
                    channel.written.fetch_add(batch_lines, Ordering::Relaxed);
                    if channel.failing.swap(false, Ordering::AcqRel) {
                        info!("audit: writing to {} again", config.dir.display());
                    }
                    sink.last_seq = batch_last_seq;
                    wrote_since_head = true;
                    batch.clear();
                    batch_lines = 0;
                    if batch.capacity() > 16 * 1024 * 1024 {
                        batch = Vec::with_capacity(SLICE + 64 * 1024);
                    }
                    if slice_full {
                        // More was waiting: let the worker run first, then take the next slice.
                        // A slice that was not full emptied the ring: the flush is done.
                        std::thread::yield_now();
                        continue;
                    }
                }
                Err(e) => {
                    channel.write_errors.fetch_add(1, Ordering::Relaxed);
                    channel.failing.store(true, Ordering::Release);
                    if last_error_log.elapsed() > Duration::from_secs(5) {
                        error!(
                            "audit: write to {} failed: {e}; {} entries kept and retried",
                            current_path(&sink.dir, sink.worker).display(),
                            batch_lines
                        );
                        last_error_log = Instant::now();
                    }
                    // The file may be gone or replaced: open it again before the retry.
                    sink.file = None;
                    std::thread::sleep(config.flush.min(Duration::from_millis(100)));
                    let _ = sink.reopen();
                    continue;
                }
            }
        }
        // The ring is empty: record where the chain ends, once per flush.
        if wrote_since_head {
            write_head(sink);
            wrote_since_head = false;
        }
        if stopping && channel.ring.used() == 0 {
            return;
        }
        std::thread::park_timeout(config.flush);
    }
}

/// Writes the rest of `batch` (from `written`), rotating first when the file would grow past
/// the limit. `written` advances with each successful write, so a retry never repeats bytes.
fn write_batch(
    config: &AuditConfig,
    sink: &mut Sink,
    batch: &[u8],
    written: &mut usize,
) -> std::io::Result<()> {
    if *written == 0 && sink.size > 0 && sink.size + batch.len() as u64 > config.max_file_bytes {
        sink.rotate()?;
    }
    if sink.file.is_none() {
        sink.reopen()?;
    }
    let file = sink
        .file
        .as_mut()
        .ok_or_else(|| std::io::Error::other("no audit file"))?;
    while *written < batch.len() {
        match file.write(&batch[*written..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "wrote nothing",
                ));
            }
            Ok(n) => {
                *written += n;
                sink.size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if config.fsync {
        file.sync_data()?;
    }
    Ok(())
}

fn write_head(sink: &Sink) {
    let path = head_path(&sink.dir, sink.worker);
    let tmp = path.with_extension("head.tmp");
    let text = format!(
        "{{\"seq\":{},\"hash\":\"{}\"}}\n",
        sink.last_seq,
        hex(&sink.prev)
    );
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}
