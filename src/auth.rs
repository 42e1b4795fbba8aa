//! Authentication: who is calling. A bearer key (header, or path key when enabled) is hashed
//! with SHA-256 and looked up by digest: the work done is the same whatever the key's bytes,
//! and the comparison is of digests, which a caller cannot steer toward a real key's.

use crate::http::head::Head;
use crate::policy::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No credential at all.
    Missing,
    /// A credential that matches no agent (or a malformed header).
    Invalid,
}

impl AuthError {
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "authentication required: send Authorization: Bearer <key>",
            AuthError::Invalid => "invalid credentials",
        }
    }
}

/// The bearer token of an `Authorization` header, if it is one.
pub fn bearer(head: &Head) -> Result<Option<&[u8]>, AuthError> {
    let mut found = None;
    for (name, value) in head.iter() {
        if !name.eq_ignore_ascii_case(b"authorization") {
            continue;
        }
        if found.is_some() {
            // Two Authorization headers: which one would a parser pick? Refuse.
            return Err(AuthError::Invalid);
        }
        let value = value.trim_ascii();
        if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
            return Err(AuthError::Invalid);
        }
        let token = value[7..].trim_ascii();
        if token.is_empty() {
            return Err(AuthError::Invalid);
        }
        found = Some(token);
    }
    Ok(found)
}

/// The agent index for `key`.
pub fn agent_for_key(policy: &Policy, key: &[u8]) -> Result<usize, AuthError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    let mut d = [0u8; 32];
    d.copy_from_slice(digest.as_ref());
    policy.agent_by_key_digest(&d).ok_or(AuthError::Invalid)
}
