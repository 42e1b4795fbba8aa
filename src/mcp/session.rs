//! Session tokens: the `Mcp-Session-Id` an agent sees is scopegate's own, an AEAD-sealed
//! (ChaCha20-Poly1305) record of the agent, the upstream and the upstream's session id. Any
//! worker, and any replica with the same `SCOPEGATE_SESSION_SECRET`, opens it without a shared
//! table; a forged token, or one presented by another agent, does not open (the agent gets 404
//! and re-initializes, as the transport specifies for unknown sessions).

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::token::{base64url, base64url_decode, base64url_decode_into};

const PREFIX: &str = "sg1.";
const AAD: &[u8] = b"scopegate-session-v1";
/// The aggregate endpoint's token: one agent, several upstream sessions.
const MULTI_PREFIX: &str = "sg2.";
/// v3: each upstream's capability bits after its session id.
const MULTI_AAD: &[u8] = b"scopegate-session-v3";
/// The longest aggregate token accepted (before decoding).
const MAX_MULTI_TOKEN: usize = 16 * 1024;
/// Longest upstream session id we carry (the spec bounds it only by "visible ASCII").
pub const MAX_UPSTREAM_SESSION: usize = 1024;

pub struct SessionKeys {
    key: LessSafeKey,
    rng: SystemRandom,
    /// Keys the per-agent secrets that bind task ids to their agent ([`SessionKeys::owner`]).
    owners: ring::hmac::Key,
}

impl SessionKeys {
    /// Keys from a configured secret, or random (sessions then do not survive a restart).
    pub fn new(secret: Option<&[u8]>) -> Result<SessionKeys, String> {
        let rng = SystemRandom::new();
        let mut material = [0u8; 32];
        match secret {
            Some(s) => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(AAD);
                ctx.update(s);
                material.copy_from_slice(ctx.finish().as_ref());
            }
            None => rng
                .fill(&mut material)
                .map_err(|_| "no system randomness for the session key".to_string())?,
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &material)
            .map_err(|_| "cannot build the session key".to_string())?;
        let owners = ring::digest::digest(
            &ring::digest::SHA256,
            &[&b"scopegate task owners\0"[..], &material].concat(),
        );
        Ok(SessionKeys {
            key: LessSafeKey::new(key),
            rng,
            owners: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, owners.as_ref()),
        })
    }

    /// A secret of agent `agent`, the same on every worker and replica sharing the session
    /// secret: the aggregate endpoint tags the task ids it gives an agent with it, so an id is
    /// good only for the agent it was given to.
    pub fn owner(&self, agent: &str) -> [u8; 32] {
        let tag = ring::hmac::sign(&self.owners, agent.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    pub fn seal(&self, agent: &str, upstream: &str, upstream_session: &[u8]) -> Option<String> {
        if agent.len() > 255
            || upstream.len() > 255
            || upstream_session.len() > MAX_UPSTREAM_SESSION
        {
            return None;
        }
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut data =
            Vec::with_capacity(2 + agent.len() + upstream.len() + upstream_session.len() + 16);
        data.push(agent.len() as u8);
        data.extend_from_slice(agent.as_bytes());
        data.push(upstream.len() as u8);
        data.extend_from_slice(upstream.as_bytes());
        data.extend_from_slice(upstream_session);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut data,
            )
            .ok()?;
        let mut raw = Vec::with_capacity(nonce.len() + data.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&data);
        Some(format!("{PREFIX}{}", base64url(&raw)))
    }

    /// Opens a token in `scratch` (its allocation reused: nothing is allocated per request once
    /// it has grown); the parts borrow from it.
    pub fn open_in<'s>(&self, token: &[u8], scratch: &'s mut Vec<u8>) -> Option<SessionRef<'s>> {
        let body = token.strip_prefix(PREFIX.as_bytes())?;
        if body.len() > 4 * (MAX_UPSTREAM_SESSION + 600) / 3 {
            return None;
        }
        if !base64url_decode_into(body, scratch) {
            return None;
        }
        if scratch.len() < aead::NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, sealed) = scratch.split_at_mut(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self.key.open_in_place(nonce, Aad::from(AAD), sealed).ok()?;
        let (&alen, rest) = plain.split_first()?;
        let agent = std::str::from_utf8(rest.get(..alen as usize)?).ok()?;
        let rest = &rest[alen as usize..];
        let (&ulen, rest) = rest.split_first()?;
        let upstream = std::str::from_utf8(rest.get(..ulen as usize)?).ok()?;
        Some(SessionRef {
            agent,
            upstream,
            upstream_session: &rest[ulen as usize..],
        })
    }
}

/// An opened session token, borrowed from the buffer it was opened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef<'a> {
    pub agent: &'a str,
    pub upstream: &'a str,
    pub upstream_session: &'a [u8],
}

/// An aggregate session: the agent and, per upstream joined at initialize, its session id
/// (empty when the upstream issued none) and the capabilities it advertised
/// ([`super::caps`] bits, in `caps`, one per upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiSession {
    pub agent: String,
    pub upstreams: Vec<(String, Vec<u8>)>,
    pub caps: Vec<u8>,
}

impl MultiSession {
    /// The capability bits of upstream `name` (0, nothing known, when it was not joined at
    /// initialize).
    pub fn caps_of(&self, name: &str) -> u8 {
        self.upstreams
            .iter()
            .position(|(n, _)| n == name)
            .and_then(|i| self.caps.get(i).copied())
            .unwrap_or(0)
    }
}

impl SessionKeys {
    /// Seals an aggregate session:
    /// `sg2.<base64url(nonce | AEAD(agent, [(upstream, session, caps)]))>`; `caps[i]` are
    /// upstream `i`'s capability bits (0 when missing).
    pub fn seal_multi(
        &self,
        agent: &str,
        upstreams: &[(String, Vec<u8>)],
        caps: &[u8],
    ) -> Option<String> {
        if agent.len() > 255 || upstreams.len() > 255 {
            return None;
        }
        let mut data = Vec::with_capacity(256);
        data.push(agent.len() as u8);
        data.extend_from_slice(agent.as_bytes());
        data.push(upstreams.len() as u8);
        for (i, (name, session)) in upstreams.iter().enumerate() {
            if name.len() > 255 || session.len() > MAX_UPSTREAM_SESSION {
                return None;
            }
            data.push(name.len() as u8);
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&(session.len() as u16).to_be_bytes());
            data.extend_from_slice(session);
            data.push(caps.get(i).copied().unwrap_or(0));
        }
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(MULTI_AAD),
                &mut data,
            )
            .ok()?;
        let mut raw = Vec::with_capacity(nonce.len() + data.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&data);
        let token = format!("{MULTI_PREFIX}{}", base64url(&raw));
        (token.len() <= MAX_MULTI_TOKEN).then_some(token)
    }

    pub fn open_multi(&self, token: &[u8]) -> Option<MultiSession> {
        let body = token.strip_prefix(MULTI_PREFIX.as_bytes())?;
        if token.len() > MAX_MULTI_TOKEN {
            return None;
        }
        let raw = base64url_decode(body)?;
        if raw.len() < aead::NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, sealed) = raw.split_at(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(MULTI_AAD), &mut sealed)
            .ok()?;
        let mut rest: &[u8] = plain;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
            rest = tail;
            Some(head)
        };
        let alen = take(1)?[0] as usize;
        let agent = std::str::from_utf8(take(alen)?).ok()?.to_owned();
        let count = take(1)?[0] as usize;
        let mut upstreams = Vec::with_capacity(count);
        let mut caps = Vec::with_capacity(count);
        for _ in 0..count {
            let nlen = take(1)?[0] as usize;
            let name = std::str::from_utf8(take(nlen)?).ok()?.to_owned();
            let slen = take(2)?;
            let slen = u16::from_be_bytes([slen[0], slen[1]]) as usize;
            upstreams.push((name, take(slen)?.to_vec()));
            caps.push(take(1)?[0]);
        }
        Some(MultiSession {
            agent,
            upstreams,
            caps,
        })
    }
}

/// One worker's memory of upstreams the aggregate endpoint joined after a session's initialize
/// (an upstream that was down then), keyed by a hash of the agent's session token and the
/// upstream. A bounded cache, not a session table: a worker that has not seen the session
/// joins again.
#[derive(Default)]
pub struct LazyJoins {
    map: std::cell::RefCell<std::collections::HashMap<(u64, usize), Join>>,
}

/// One join: the upstream session id and the capability bits ([`super::caps`]) its initialize
/// answer advertised.
type Join = (Vec<u8>, u8);

/// Most joins a worker remembers; past that the cache starts over.
const MAX_LAZY_JOINS: usize = 65_536;

impl LazyJoins {
    /// The upstream session id joined for token hash `key` on upstream `upstream`.
    pub fn get(&self, key: u64, upstream: usize) -> Option<Vec<u8>> {
        self.map
            .borrow()
            .get(&(key, upstream))
            .map(|(s, _)| s.clone())
    }

    /// The capability bits of that join.
    pub fn caps(&self, key: u64, upstream: usize) -> Option<u8> {
        self.map.borrow().get(&(key, upstream)).map(|(_, c)| *c)
    }

    pub fn insert(&self, key: u64, upstream: usize, session: Vec<u8>, caps: u8) {
        let mut map = self.map.borrow_mut();
        if map.len() >= MAX_LAZY_JOINS {
            map.clear();
        }
        map.insert((key, upstream), (session, caps));
    }

    pub fn remove(&self, key: u64, upstream: usize) {
        self.map.borrow_mut().remove(&(key, upstream));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a token: (agent, upstream, upstream session).
    fn open(keys: &SessionKeys, token: &[u8]) -> Option<(String, String, Vec<u8>)> {
        let mut scratch = Vec::new();
        keys.open_in(token, &mut scratch).map(|s| {
            (
                s.agent.to_owned(),
                s.upstream.to_owned(),
                s.upstream_session.to_vec(),
            )
        })
    }

    #[test]
    fn seal_and_open() {
        let keys = SessionKeys::new(Some(b"0123456789abcdef0123456789abcdef")).unwrap();
        let t = keys.seal("triage-bot", "github", b"abc-123").unwrap();
        assert!(
            t.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "visible ASCII only"
        );
        let (agent, upstream, upstream_session) = open(&keys, t.as_bytes()).unwrap();
        assert_eq!(agent, "triage-bot");
        assert_eq!(upstream, "github");
        assert_eq!(upstream_session, b"abc-123");
        // Two seals of the same record differ (random nonce), both open.
        let t2 = keys.seal("triage-bot", "github", b"abc-123").unwrap();
        assert_ne!(t, t2);
        assert!(open(&keys, t2.as_bytes()).is_some());
    }

    #[test]
    fn replicas_with_the_same_secret_agree_and_others_do_not() {
        let a = SessionKeys::new(Some(b"0123456789abcdef0123456789abcdef")).unwrap();
        let b = SessionKeys::new(Some(b"0123456789abcdef0123456789abcdef")).unwrap();
        let c = SessionKeys::new(Some(b"another secret, 32 characters!!!")).unwrap();
        let t = a.seal("x", "u", b"s").unwrap();
        assert!(open(&b, t.as_bytes()).is_some());
        assert!(open(&c, t.as_bytes()).is_none());
    }

    #[test]
    fn multi_sessions_seal_and_open_and_do_not_mix_with_single() {
        let keys = SessionKeys::new(Some(b"0123456789abcdef0123456789abcdef")).unwrap();
        let ups = vec![
            ("github".to_string(), b"gh-1".to_vec()),
            ("jira".to_string(), Vec::new()),
        ];
        let t = keys.seal_multi("bot", &ups, &[0x81]).unwrap();
        assert!(t.starts_with("sg2."));
        assert!(t.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        let s = keys.open_multi(t.as_bytes()).unwrap();
        assert_eq!(s.agent, "bot");
        assert_eq!(s.upstreams, ups);
        // Capability bits travel per upstream; one not given is unknown (0).
        assert_eq!(
            (s.caps_of("github"), s.caps_of("jira"), s.caps_of("x")),
            (0x81, 0, 0)
        );
        // A single-upstream token is not an aggregate one and the other way round.
        assert!(open(&keys, t.as_bytes()).is_none());
        let single = keys.seal("bot", "github", b"gh-1").unwrap();
        assert!(keys.open_multi(single.as_bytes()).is_none());
        let mut forged = t.into_bytes();
        let i = forged.len() - 2;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        assert!(keys.open_multi(&forged).is_none());
    }

    #[test]
    fn forgeries_do_not_open() {
        let keys = SessionKeys::new(None).unwrap();
        let t = keys.seal("x", "u", b"s").unwrap();
        let mut bytes = t.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(open(&keys, &bytes).is_none());
        assert!(open(&keys, b"mock-session-0").is_none());
        assert!(open(&keys, b"sg1.").is_none());
        assert!(open(&keys, b"sg1.!!!!").is_none());
    }
}
