//! Child processes for stdio MCP servers: started with a scrubbed environment in their own
//! process group, tied to scopegate's life, their stderr logged under the upstream's name and
//! rate-limited (never shown to an agent), and killed with their whole group. The message bridge
//! that speaks JSON-RPC over their stdin and stdout builds on this.
//!
//! Tied to scopegate's life, and its limits: the direct child gets `PR_SET_PDEATHSIG` (SIGKILL),
//! so a SIGKILL of scopegate ends it. Its own children (a server started through `npx` or a
//! shell) see their stdin reach end of file when scopegate dies, which ends every stdio MCP
//! server that reads its requests; a grandchild that ignores stdin is beyond reach. The signal
//! follows the *thread* that forked (children must be started from threads that live as long as
//! scopegate, never from a pool's) and is cleared by exec of a setuid program.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The variables a child inherits from scopegate's environment; everything else it gets is
/// listed by its upstream (`env = { ... }`). Never scopegate's own settings, keys or other
/// upstreams' credentials.
pub const INHERITED: &[&str] = &["PATH", "HOME", "LANG"];

/// At most this many stderr lines per second are logged per child; the rest are counted.
pub const STDERR_LINES_PER_SECOND: u32 = 20;

/// How long a child has to exit after SIGTERM before its group gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_millis(500);

/// How to start one stdio server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Variables the child gets besides [`INHERITED`] (values already expanded).
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
}

/// A running stdio server: its pipes, and its process group, killed when this is dropped.
/// The leader is reaped only after its group is gone, so the group id cannot be reused by an
/// unrelated process while signals may still be sent to it.
pub struct Process {
    child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    /// Killed and reaped: nothing more to signal.
    done: bool,
}

impl Process {
    /// Starts `spec` for upstream `name`; its stderr goes to scopegate's log.
    pub fn spawn(name: &str, spec: &Spec) -> std::io::Result<Process> {
        let (program, args) = spec
            .command
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: killing the group takes its children (npx, sh wrappers) too.
            .process_group(0);
        for var in INHERITED {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                // Dies with scopegate, even when scopegate is killed with SIGKILL. (The signal
                // follows the thread that forked; children are started by threads that live
                // as long as the process.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // scopegate died between fork and prctl: the signal will never come.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                // Nothing of scopegate's but the three pipes crosses exec: agents' sockets
                // (io_uring accepts them without close-on-exec), listeners, the audit log.
                // Marked close-on-exec rather than closed, so the spawn's own error pipe
                // still reports a failed exec.
                close_on_exec_from(3);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        if let Some(stderr) = child.stderr.take() {
            let name = name.to_owned();
            let _ = std::thread::Builder::new()
                .name(format!("stderr-{name}"))
                .spawn(move || log_stderr(&name, stderr));
        }
        Ok(Process {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            child,
            done: false,
        })
    }

    /// [`spawn`](Self::spawn), forked by a thread that lives as long as scopegate (the one
    /// spawner thread), whichever thread asks: the parent-death signal follows the forking
    /// thread, and the bridge threads that ask come and go with their connections.
    pub fn spawn_lasting(name: &str, spec: &Spec) -> std::io::Result<Process> {
        type Ask = (String, Spec, mpsc::Sender<std::io::Result<Process>>);
        static SPAWNER: OnceLock<Mutex<mpsc::Sender<Ask>>> = OnceLock::new();
        let spawner = SPAWNER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Ask>();
            let started = std::thread::Builder::new()
                .name("stdio-spawner".into())
                .spawn(move || {
                    for (name, spec, answer) in rx {
                        let _ = answer.send(Process::spawn(&name, &spec));
                    }
                });
            if let Err(e) = started {
                crate::error!("cannot start the stdio spawner thread: {e}");
            }
            Mutex::new(tx)
        });
        let (tx, rx) = mpsc::channel();
        spawner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((name.to_owned(), spec.clone(), tx))
            .map_err(|_| std::io::Error::other("the stdio spawner thread is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("the stdio spawner thread is gone"))?
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the leader has exited. It is not reaped here (see [`Process`]).
    pub fn exited(&self) -> bool {
        self.done || self.exit_info().is_some()
    }

    /// How the leader ended, once it has (not reaped: see [`Process`]): `exit code N` or
    /// `killed by signal N`.
    pub fn exit_code(&self) -> Option<String> {
        let info = self.exit_info()?;
        // SAFETY: set by waitid for a child that changed state.
        let status = unsafe { info.si_status() };
        Some(if info.si_code == libc::CLD_EXITED {
            format!("exit code {status}")
        } else {
            format!("killed by signal {status}")
        })
    }

    /// The leader's exit, looked at without reaping it (`WNOWAIT`); `None` while it runs.
    fn exit_info(&self) -> Option<libc::siginfo_t> {
        // SAFETY: a zeroed siginfo_t is a valid value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with WNOWAIT: looks without reaping.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set by waitid when a child changed state, zero otherwise.
        (r == 0 && unsafe { info.si_pid() } != 0).then_some(info)
    }

    /// Ends the whole group: SIGTERM, then SIGKILL after [`TERM_GRACE`]; reaps the leader
    /// (and members adopted by scopegate, when it runs as PID 1) once the group is gone.
    pub fn kill(&mut self) {
        if self.done {
            return;
        }
        // Closing stdin first lets a well-behaved server exit on its own.
        self.stdin = None;
        let group = self.child.id() as libc::pid_t;
        // The leader is not reaped yet, so `group` still names this group only.
        // SAFETY: signals to the process group this struct created.
        unsafe {
            libc::kill(-group, libc::SIGTERM);
        }
        if !wait_gone(group, TERM_GRACE) {
            // SAFETY: as above.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
            wait_gone(group, TERM_GRACE);
        }
        let _ = self.child.wait();
        self.done = true;
    }
}

/// Waits until no process of `group` is left running (reaping those that are scopegate's own
/// children), up to `limit`.
fn wait_gone(group: libc::pid_t, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        // SAFETY: reaps, without blocking, only members of our group that are our children.
        while unsafe { libc::waitpid(-group, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        if !group_alive(group) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether any process of group `group` is left running. Zombies do not count: a killed
/// grandchild waits for whoever adopted it to reap it, and signals can no longer reach it.
fn group_alive(group: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(-group, 0) } != 0 {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so read after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|g| g.parse::<libc::pid_t>().ok());
        pgrp == Some(group) && !matches!(state, Some("Z" | "X"))
    })
}

/// Marks every descriptor from `first` on close-on-exec. Runs between fork and exec: only
/// async-signal-safe calls (close_range, or getrlimit and fcntl on older kernels).
fn close_on_exec_from(first: libc::c_int) {
    // SAFETY: plain syscalls on this (forked) process's own descriptor table.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            4096
        };
        for fd in first..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// The longest stderr line logged; the rest of a longer line is dropped.
const MAX_LINE: usize = 2000;

/// Copies a child's stderr into scopegate's log, `[name] line`, at most
/// [`STDERR_LINES_PER_SECOND`] lines a second; the lines dropped are counted. It keeps reading
/// whatever comes (bytes that are not UTF-8, endless lines), so the child never blocks on a
/// full stderr pipe.
fn log_stderr(name: &str, stderr: std::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut second = Instant::now();
    let (mut logged, mut dropped) = (0u32, 0u64);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Reads up to a newline, keeping at most MAX_LINE bytes of it.
        let mut cut = false;
        loop {
            let chunk = match reader.fill_buf() {
                Ok([]) => break,
                Ok(chunk) => chunk,
                Err(_) => break,
            };
            let (take, end) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..take.min(room)]);
            cut |= take > room;
            reader.consume(if end { take + 1 } else { take });
            if end {
                break;
            }
        }
        if line.is_empty() && !cut && reader.fill_buf().map_or(true, <[u8]>::is_empty) {
            break;
        }
        if second.elapsed() >= Duration::from_secs(1) {
            if dropped > 0 {
                crate::warn!(
                    "[{name}] ({dropped} stderr lines not logged: over {STDERR_LINES_PER_SECOND}/s)"
                );
            }
            second = Instant::now();
            (logged, dropped) = (0, 0);
        }
        if logged < STDERR_LINES_PER_SECOND {
            logged += 1;
            let text: String = String::from_utf8_lossy(&line)
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            crate::warn!("[{name}] {text}{}", if cut { " [cut]" } else { "" });
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        crate::warn!(
            "[{name}] ({dropped} stderr lines not logged: over {STDERR_LINES_PER_SECOND}/s)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn sh(script: &str, env: &[(&str, &str)]) -> Spec {
        Spec {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: None,
        }
    }

    #[test]
    fn the_environment_is_scrubbed() {
        // Whatever scopegate's environment holds, the child sees only the inherited names and
        // its own.
        let mut p = Process::spawn("t", &sh("env", &[("TOKEN", "for-this-server")])).unwrap();
        let mut out = String::new();
        p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let names: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_")
            .collect();
        for n in &names {
            assert!(INHERITED.contains(n) || *n == "TOKEN", "leaked {n}: {out}");
        }
        assert!(out.contains("TOKEN=for-this-server"));
    }

    #[test]
    fn pipes_carry_lines_both_ways() {
        let mut p = Process::spawn("t", &sh("read line; echo \"got $line\"", &[])).unwrap();
        p.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
        let mut out = String::new();
        p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "got hello\n");
    }

    #[test]
    fn kill_takes_the_whole_group() {
        // A wrapper with children of its own (like npx), each ignoring stdin's end.
        let mut p = Process::spawn("t", &sh("sleep 60 & sleep 60 & wait", &[])).unwrap();
        let group = p.pid() as libc::pid_t;
        std::thread::sleep(Duration::from_millis(100));
        assert!(group_alive(group));
        p.kill();
        // kill() returns once the group is gone, or after SIGKILL and a bounded wait.
        assert!(
            wait_gone(group, Duration::from_secs(5)),
            "a process of the group survived"
        );
    }

    #[test]
    fn a_child_dies_with_the_thread_that_started_it() {
        // PR_SET_PDEATHSIG: the child of a thread (here one that ends at once) is killed
        // when it goes, the way scopegate's children go when scopegate is killed.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut p = Process::spawn("t", &sh("sleep 60", &[])).unwrap();
            tx.send(p.pid()).unwrap();
            // Forget it: no kill on drop, only the death signal is left to end it.
            p.stdin = None;
            std::mem::forget(p);
        })
        .join()
        .unwrap();
        let pid = rx.recv().unwrap() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = 0;
        let mut reaped = 0;
        while Instant::now() < deadline {
            // SAFETY: reaping our own child by pid, without blocking.
            reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(reaped, pid, "the child outlived the thread that started it");
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }

    #[test]
    fn stderr_that_is_not_text_does_not_stop_the_logger() {
        // Bytes that are not UTF-8, then a long line, then more than a pipe holds: the child
        // finishes only if its stderr is drained all along.
        let script = "printf '\\377\\376 bad\\n' >&2; head -c 200000 /dev/zero | tr '\\0' x >&2; \
                      i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; echo done";
        let mut p = Process::spawn("t", &sh(script, &[])).unwrap();
        let mut out = String::new();
        p.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "done\n");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let spec = Spec {
            command: vec!["/nonexistent/mcp-server".into()],
            env: Vec::new(),
            cwd: None,
        };
        assert!(Process::spawn("t", &spec).is_err());
        let empty = Spec {
            command: Vec::new(),
            env: Vec::new(),
            cwd: None,
        };
        assert!(Process::spawn("t", &empty).is_err());
    }
}
