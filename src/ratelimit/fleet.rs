//! Limits that hold across a fleet of replicas: every bucket's state lives in Redis, and each
//! replica spends leases of it ([`super::lease`]) so Redis stays off the per-call path.
//!
//! Redis keeps each bucket's GCRA theoretical arrival time under `{prefix}rl:{key}`, where the
//! key names the limit by ids (the same on every replica and after a reload). One Lua script
//! ([`TAKE`]) reads Redis's clock, grants up to the tokens asked for that fit the burst and
//! moves the arrival time by as many emission intervals, atomically; the key expires when the
//! bucket is full again. So the total admitted fleet-wide over any window is at most the limit
//! plus the tokens leased out and not yet spent (about one lease per replica and bucket).
//!
//! How calls spend leases, and what happens when Redis cannot be asked, is
//! [`super::leased`]'s.
//!
//! Replicas count themselves: every second worker 0 of each replica registers in a sorted set
//! (`{prefix}replicas`, scored by Redis time; entries older than 3 s are dropped), which sizes
//! leases and the fallback's share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::bucket::{Bucket, Gcra, now_ns};
use crate::redis::{Client, Failure, Link, RedisUrl, Script, Value, resp};

/// What a replica does while Redis is unreachable (`SCOPEGATE_REDIS_FALLBACK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Each replica enforces its share of every limit (the default).
    Local,
    /// Calls under any limit are refused.
    Closed,
}

impl Fallback {
    pub fn name(self) -> &'static str {
        match self {
            Fallback::Local => "local",
            Fallback::Closed => "closed",
        }
    }
}

/// `SCOPEGATE_REDIS_*`.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    pub url: RedisUrl,
    /// For `rediss://`: trusted instead of the machine's CA store.
    pub ca_file: Option<std::path::PathBuf>,
    /// The longest a call waits for Redis, and the longest a reply may take before the link
    /// counts Redis as unreachable.
    pub timeout: Duration,
    pub fallback: Fallback,
    /// Prefixes every key (several fleets can share one Redis).
    pub prefix: String,
    /// Replicas assumed at least (before any has been counted, and as a floor after).
    pub replicas: u32,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 50;
pub const DEFAULT_PREFIX: &str = "scopegate:";
/// A replica not seen for this long no longer counts.
const REPLICA_TTL_MS: u64 = 3000;
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A lease covers about this much of a bucket's rate, split between the replicas.
pub const LEASE_WINDOW_NS: u64 = 10_000_000;

/// KEYS[1] the bucket; ARGV interval and tolerance (µs), tokens wanted.
/// Returns `{granted, µs until one token}`.
pub const TAKE: &str = r#"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval)
if room > want then room = want end
if room > 0 then
  tat = tat + room * interval
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  return {room, 0}
end
return {0, math.ceil(tat + interval - tolerance - now)}
"#;

/// KEYS[1] the replicas' sorted set; ARGV this replica's id, the TTL (ms). Returns how many
/// replicas were seen within the TTL.
pub const HEARTBEAT_SCRIPT: &str = r#"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// What the replica's workers share.
pub struct Fleet {
    pub settings: FleetSettings,
    pub client: Arc<Client>,
    take: Script,
    heartbeat: Script,
    replica_id: String,
    replicas_seen: AtomicU32,
    /// Per worker (each writes only its own).
    pub counters: Box<[Counters]>,
}

/// One worker's fleet counters, on a cache line of their own.
#[derive(Default)]
#[repr(align(64))]
pub struct Counters {
    /// Tokens Redis granted.
    pub leased: AtomicU64,
    /// Decisions made without Redis (the fallback's share, or refused as configured).
    pub fallbacks: AtomicU64,
}

impl Fleet {
    /// `workers`: how many workers will each start a link.
    pub fn new(settings: FleetSettings, workers: usize) -> Result<Arc<Fleet>, String> {
        let take = Script::new(TAKE);
        let heartbeat = Script::new(HEARTBEAT_SCRIPT);
        let when_down = match settings.fallback {
            Fallback::Local => "each replica enforces its share of every limit \
                                (SCOPEGATE_REDIS_FALLBACK=local) until it is back"
                .to_owned(),
            Fallback::Closed => "calls under any rate limit are refused \
                                 (SCOPEGATE_REDIS_FALLBACK=closed) until it is back"
                .to_owned(),
        };
        let client = Client::new(
            settings.url.clone(),
            settings.ca_file.clone(),
            settings.timeout,
            vec![take.clone(), heartbeat.clone()],
            when_down,
            workers,
        )?;
        Ok(Arc::new(Fleet {
            client: Arc::new(client),
            take,
            heartbeat,
            replica_id: replica_id(),
            replicas_seen: AtomicU32::new(0),
            counters: (0..workers.max(1)).map(|_| Counters::default()).collect(),
            settings,
        }))
    }

    /// Tokens Redis granted to this replica.
    pub fn leased(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.leased.load(Ordering::Relaxed))
            .sum()
    }

    /// Limit decisions this replica made without Redis.
    pub fn fallbacks(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.fallbacks.load(Ordering::Relaxed))
            .sum()
    }

    /// The replicas sharing the limits: those seen lately, at least the configured floor.
    pub fn replicas(&self) -> u64 {
        let seen = self.replicas_seen.load(Ordering::Relaxed);
        u64::from(seen.max(self.settings.replicas).max(1))
    }

    pub(super) fn take_command(&self, b: &Bucket, want: u64) -> Vec<u8> {
        let key = self.key(&format!("rl:{}", b.key));
        let interval = format!("{}", b.limit.interval as f64 / 1000.0);
        let tolerance = format!("{}", b.limit.tolerance as f64 / 1000.0);
        let want = want.to_string();
        let mut out = Vec::with_capacity(128 + key.len());
        resp::encode(
            &mut out,
            &[
                b"EVALSHA",
                self.take.sha.as_bytes(),
                b"1",
                &key,
                interval.as_bytes(),
                tolerance.as_bytes(),
                want.as_bytes(),
            ],
        );
        out
    }

    fn key(&self, what: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.settings.prefix.len() + 3 + what.len());
        k.extend_from_slice(self.settings.prefix.as_bytes());
        k.extend_from_slice(what.as_bytes());
        k
    }
}

/// 16 hex characters from the system's random source, unique per process.
fn replica_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b = (u64::from(std::process::id()) ^ now_ns()).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Tokens a replica leases at once from a bucket `gcra`, with `replicas` replicas sharing it:
/// about [`LEASE_WINDOW_NS`] of the rate split between them, at most half the burst's share (so
/// the leases out do not hold a bucket's whole burst), at least one.
pub fn lease_size(gcra: Gcra, replicas: u64) -> u64 {
    let replicas = replicas.max(1);
    let per_window = LEASE_WINDOW_NS / gcra.interval / replicas;
    let burst = gcra.tolerance / gcra.interval;
    per_window.min(burst / 2 / replicas).max(1)
}

/// The bucket each of `replicas` replicas enforces alone when the fleet's store is
/// unreachable: its share of the rate and of the burst (at least one token).
pub fn local_share(gcra: Gcra, replicas: u64) -> Gcra {
    let replicas = replicas.max(1);
    let interval = gcra.interval.saturating_mul(replicas);
    let burst = (gcra.tolerance / gcra.interval / replicas).max(1);
    Gcra {
        interval,
        tolerance: interval.saturating_mul(burst),
    }
}

/// `{granted, µs until one}` from the take script's reply.
pub(super) fn granted(reply: &Result<Value, Failure>) -> Option<(u64, u64)> {
    let Ok(Value::Array(Some(items))) = reply else {
        return None;
    };
    match items.as_slice() {
        [n, wait] => Some((n.as_int()?.max(0) as u64, wait.as_int()?.max(0) as u64)),
        _ => None,
    }
}

/// Logs a reply the take script cannot give (an error such as `OOM` or `BUSY`), at most once a
/// second: every call can meet it.
#[cold]
pub(super) fn unexpected(v: &Value) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ns();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1_000_000_000
        && LAST
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        crate::warn!("Redis answered the rate-limit script with {v:?}; deciding without it");
    }
}

/// Registers this replica every [`HEARTBEAT`] and learns how many there are.
pub(super) async fn heartbeat(fleet: Arc<Fleet>, link: Link) {
    let key = fleet.key("replicas");
    let ttl = REPLICA_TTL_MS.to_string();
    loop {
        let mut command = Vec::with_capacity(128);
        resp::encode(
            &mut command,
            &[
                b"EVALSHA",
                fleet.heartbeat.sha.as_bytes(),
                b"1",
                &key,
                fleet.replica_id.as_bytes(),
                ttl.as_bytes(),
            ],
        );
        if !link.is_up() {
            // Register as soon as the link is up.
            monoio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let f = fleet.clone();
        let _ = link.send(
            command,
            Box::new(move |reply| {
                if let Ok(Value::Int(n)) = reply {
                    // Bounded as SCOPEGATE_REDIS_REPLICAS is, whatever the reply says.
                    let n = n.clamp(1, 10_000) as u32;
                    f.replicas_seen.store(n, Ordering::Relaxed);
                }
            }),
        );
        monoio::time::sleep(HEARTBEAT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_sizes_follow_rate_burst_and_replicas() {
        // 100,000/s, burst 100,000, alone: 10 ms of the rate.
        assert_eq!(lease_size(Gcra::new(100_000.0, 100_000), 1), 1000);
        // Three replicas split it.
        assert_eq!(lease_size(Gcra::new(100_000.0, 100_000), 3), 333);
        // A small burst caps it: burst 20 over 3 replicas leases 3 at most.
        assert_eq!(lease_size(Gcra::new(100_000.0, 20), 3), 3);
        // Slow limits lease one token at a time.
        assert_eq!(lease_size(Gcra::new(100.0, 100), 3), 1);
        assert_eq!(lease_size(Gcra::new(1.0 / 60.0, 20), 3), 1);
    }

    #[test]
    fn local_share_divides_rate_and_burst() {
        let g = local_share(Gcra::new(90.0, 30), 3);
        assert_eq!(g, Gcra::new(30.0, 10));
        // A burst smaller than the replica count still admits one.
        let g = local_share(Gcra::new(10.0, 2), 3);
        assert_eq!(g.tolerance, g.interval);
    }
}
