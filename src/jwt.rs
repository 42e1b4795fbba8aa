//! JWT bearer tokens, so scopegate can be the OAuth 2.1 resource server MCP's authorization
//! spec describes: HS256, RS256 and ES256 signatures (ring), keys from a JWKS file, `iss`,
//! `aud` (RFC 8707: issued for this server), `exp` and `nbf` checked; the agent is the policy's
//! `[[agent]]` whose id equals the `sub` claim (or `SCOPEGATE_JWT_AGENT_CLAIM`).

use ring::signature::{self, UnparsedPublicKey};
use simd_json::OwnedValue;
use simd_json::prelude::*;

use crate::token::base64url_decode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Hs256,
    Rs256,
    Es256,
}

enum KeyMaterial {
    Hmac(ring::hmac::Key),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point (0x04 || x || y).
    Ec(Vec<u8>),
}

struct Jwk {
    kid: Option<String>,
    alg: Alg,
    key: KeyMaterial,
}

pub struct JwtVerifier {
    keys: Vec<Jwk>,
    issuer: String,
    audience: String,
    agent_claim: String,
    leeway_s: u64,
}

/// Why a token was refused (logged at debug; the agent only learns "invalid credentials").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    Malformed(&'static str),
    UnsupportedAlg(String),
    NoKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    NoAgentClaim,
}

/// The largest token accepted; real ones are a few hundred bytes to a few KiB.
const MAX_TOKEN: usize = 16 * 1024;

impl JwtVerifier {
    /// Builds a verifier from a JWKS document (`{"keys":[...]}`).
    pub fn from_jwks(
        jwks: &str,
        issuer: &str,
        audience: &str,
        agent_claim: &str,
        leeway_s: u64,
    ) -> Result<JwtVerifier, String> {
        let mut bytes = jwks.as_bytes().to_vec();
        let doc: OwnedValue =
            simd_json::to_owned_value(&mut bytes).map_err(|e| format!("not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("expected {\"keys\": [...]}")?;
        let mut keys = Vec::new();
        for (i, k) in list.iter().enumerate() {
            let field = |name: &str| k.get(name).and_then(|v| v.as_str());
            let b64 = |name: &str| {
                field(name)
                    .and_then(|v| base64url_decode(v.trim_end_matches('=').as_bytes()))
                    .ok_or_else(|| format!("key {i}: missing or bad {name:?}"))
            };
            let kty = field("kty").ok_or_else(|| format!("key {i}: no \"kty\""))?;
            let (alg, key) = match kty {
                "oct" => (
                    Alg::Hs256,
                    KeyMaterial::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64("k")?)),
                ),
                "RSA" => {
                    let n = b64("n")?;
                    if n.len() < 256 {
                        return Err(format!("key {i}: RSA keys under 2048 bits are refused"));
                    }
                    (Alg::Rs256, KeyMaterial::Rsa { n, e: b64("e")? })
                }
                "EC" => {
                    if field("crv") != Some("P-256") {
                        return Err(format!(
                            "key {i}: only EC keys on P-256 (ES256) are supported"
                        ));
                    }
                    let (x, y) = (b64("x")?, b64("y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("key {i}: P-256 coordinates must be 32 bytes"));
                    }
                    let mut point = vec![4u8];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    (Alg::Es256, KeyMaterial::Ec(point))
                }
                other => return Err(format!("key {i}: unsupported kty {other:?}")),
            };
            if let Some(declared) = field("alg") {
                let expected = match alg {
                    Alg::Hs256 => "HS256",
                    Alg::Rs256 => "RS256",
                    Alg::Es256 => "ES256",
                };
                if declared != expected {
                    return Err(format!(
                        "key {i}: alg {declared:?} is not supported for kty {kty:?}"
                    ));
                }
            }
            keys.push(Jwk {
                kid: field("kid").map(str::to_owned),
                alg,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the key set is empty".into());
        }
        Ok(JwtVerifier {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            agent_claim: agent_claim.to_owned(),
            leeway_s,
        })
    }

    /// Whether a bearer token is shaped like a JWT (three base64url parts).
    pub fn looks_like_jwt(token: &[u8]) -> bool {
        token.iter().filter(|&&b| b == b'.').count() == 2 && token.starts_with(b"eyJ")
    }

    /// Verifies `token` at time `now` (seconds since the epoch); returns the agent id it names.
    pub fn verify(&self, token: &[u8], now: u64) -> Result<String, JwtError> {
        if token.len() > MAX_TOKEN {
            return Err(JwtError::Malformed("token too long"));
        }
        let mut parts = token.split(|&b| b == b'.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("not three parts"));
        };
        let signed = &token[..h.len() + 1 + p.len()];
        let mut header =
            base64url_decode(h).ok_or(JwtError::Malformed("header is not base64url"))?;
        let signature =
            base64url_decode(s).ok_or(JwtError::Malformed("signature is not base64url"))?;
        let header: OwnedValue = simd_json::to_owned_value(&mut header)
            .map_err(|_| JwtError::Malformed("header is not JSON"))?;
        let alg = match header.get("alg").and_then(|v| v.as_str()) {
            Some("HS256") => Alg::Hs256,
            Some("RS256") => Alg::Rs256,
            Some("ES256") => Alg::Es256,
            Some(other) => return Err(JwtError::UnsupportedAlg(other.to_owned())),
            None => return Err(JwtError::Malformed("no alg")),
        };
        if header.get("crit").is_some() {
            return Err(JwtError::Malformed(
                "critical header extensions are not supported",
            ));
        }
        let kid = header.get("kid").and_then(|v| v.as_str());
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| {
                k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::NoKey);
        }
        if !candidates.any(|k| verify_signature(k, signed, &signature)) {
            return Err(JwtError::BadSignature);
        }

        let mut payload =
            base64url_decode(p).ok_or(JwtError::Malformed("payload is not base64url"))?;
        let claims: OwnedValue = simd_json::to_owned_value(&mut payload)
            .map_err(|_| JwtError::Malformed("payload is not JSON"))?;
        let number = |name: &str| {
            claims
                .get(name)
                .and_then(|v| v.as_f64().or_else(|| v.as_u64().map(|n| n as f64)))
        };
        let exp = number("exp").ok_or(JwtError::Malformed("no exp"))?;
        if (now as f64) > exp + self.leeway_s as f64 {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = number("nbf")
            && (now as f64) + (self.leeway_s as f64) < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        if claims.get("iss").and_then(|v| v.as_str()) != Some(self.issuer.as_str()) {
            return Err(JwtError::WrongIssuer);
        }
        let audience_ok = match claims.get("aud") {
            Some(v) if v.as_str().is_some() => v.as_str() == Some(self.audience.as_str()),
            Some(v) => v
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(self.audience.as_str()))),
            None => false,
        };
        if !audience_ok {
            return Err(JwtError::WrongAudience);
        }
        claims
            .get(self.agent_claim.as_str())
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or(JwtError::NoAgentClaim)
    }
}

fn verify_signature(key: &Jwk, signed: &[u8], sig: &[u8]) -> bool {
    match &key.key {
        KeyMaterial::Hmac(k) => ring::hmac::verify(k, signed, sig).is_ok(),
        KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
            .is_ok(),
        KeyMaterial::Ec(point) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, sig)
                .is_ok()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::token::base64url;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    pub fn sign_hs256(secret: &[u8], header: &str, claims: &str) -> String {
        let signed = format!(
            "{}.{}",
            base64url(header.as_bytes()),
            base64url(claims.as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", base64url(tag.as_ref()))
    }

    const NOW: u64 = 1_800_000_000;

    fn claims(extra: &str) -> String {
        format!(
            r#"{{"iss":"https://auth.test","aud":"https://gw.test/mcp","sub":"agent-1","exp":{},{extra}"iat":{NOW}}}"#,
            NOW + 600
        )
    }

    fn hs_verifier() -> JwtVerifier {
        let jwks = format!(
            r#"{{"keys":[{{"kty":"oct","kid":"h1","k":"{}"}}]}}"#,
            base64url(b"a-very-secret-hmac-key-32-bytes!")
        );
        JwtVerifier::from_jwks(&jwks, "https://auth.test", "https://gw.test/mcp", "sub", 30)
            .unwrap()
    }

    #[test]
    fn hs256_and_claims() {
        let v = hs_verifier();
        let h = r#"{"alg":"HS256","typ":"JWT","kid":"h1"}"#;
        let secret = b"a-very-secret-hmac-key-32-bytes!";
        let t = sign_hs256(secret, h, &claims(""));
        assert!(JwtVerifier::looks_like_jwt(t.as_bytes()));
        assert_eq!(v.verify(t.as_bytes(), NOW), Ok("agent-1".into()));
        assert_eq!(v.verify(t.as_bytes(), NOW + 700), Err(JwtError::Expired));
        let t = sign_hs256(secret, h, &claims(&format!(r#""nbf":{},"#, NOW + 100)));
        assert_eq!(v.verify(t.as_bytes(), NOW), Err(JwtError::NotYetValid));
        let t = sign_hs256(
            secret,
            h,
            &claims("").replace("https://auth.test", "https://evil.test"),
        );
        assert_eq!(v.verify(t.as_bytes(), NOW), Err(JwtError::WrongIssuer));
        let t = sign_hs256(
            secret,
            h,
            &claims("").replace("https://gw.test/mcp", "https://other.test/mcp"),
        );
        assert_eq!(v.verify(t.as_bytes(), NOW), Err(JwtError::WrongAudience));
        let t = sign_hs256(
            secret,
            h,
            &claims("").replace(
                r#""aud":"https://gw.test/mcp""#,
                r#""aud":["x","https://gw.test/mcp"]"#,
            ),
        );
        assert_eq!(v.verify(t.as_bytes(), NOW), Ok("agent-1".into()));
        let t = sign_hs256(b"another-secret-another-secret-xx", h, &claims(""));
        assert_eq!(v.verify(t.as_bytes(), NOW), Err(JwtError::BadSignature));
        let t = sign_hs256(secret, r#"{"alg":"none"}"#, &claims(""));
        assert_eq!(
            v.verify(t.as_bytes(), NOW),
            Err(JwtError::UnsupportedAlg("none".into()))
        );
        // An RS256 header cannot be verified with the HMAC key (no algorithm confusion).
        let t = sign_hs256(secret, r#"{"alg":"RS256"}"#, &claims(""));
        assert_eq!(v.verify(t.as_bytes(), NOW), Err(JwtError::NoKey));
        assert!(v.verify(b"a.b", NOW).is_err());
    }

    #[test]
    fn es256() {
        let rng = SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pair = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let point = pair.public_key().as_ref();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","x":"{}","y":"{}"}}]}}"#,
            base64url(&point[1..33]),
            base64url(&point[33..65])
        );
        let v = JwtVerifier::from_jwks(&jwks, "https://auth.test", "https://gw.test/mcp", "sub", 0)
            .unwrap();
        let signed = format!(
            "{}.{}",
            base64url(br#"{"alg":"ES256"}"#),
            base64url(claims("").as_bytes())
        );
        let sig = pair.sign(&rng, signed.as_bytes()).unwrap();
        let t = format!("{signed}.{}", base64url(sig.as_ref()));
        assert_eq!(v.verify(t.as_bytes(), NOW), Ok("agent-1".into()));
        let forged_claims = base64url(claims("").replace("agent-1", "agent-2").as_bytes());
        let tampered = t.replace(&base64url(claims("").as_bytes()), &forged_claims);
        assert_ne!(tampered, t);
        assert_eq!(
            v.verify(tampered.as_bytes(), NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn rs256() {
        let der = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt-rsa-test-key.der"
        ))
        .unwrap();
        let pair = signature::RsaKeyPair::from_der(&der).unwrap();
        let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let jwks = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"r1","n":"{}","e":"{}"}}]}}"#,
            base64url(&public.n),
            base64url(&public.e)
        );
        let v = JwtVerifier::from_jwks(&jwks, "https://auth.test", "https://gw.test/mcp", "sub", 0)
            .unwrap();
        let signed = format!(
            "{}.{}",
            base64url(br#"{"alg":"RS256","kid":"r1"}"#),
            base64url(claims("").as_bytes())
        );
        let mut sig = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signed.as_bytes(),
            &mut sig,
        )
        .unwrap();
        let t = format!("{signed}.{}", base64url(&sig));
        assert_eq!(v.verify(t.as_bytes(), NOW), Ok("agent-1".into()));
        let wrong_kid = t.replacen(
            &base64url(br#"{"alg":"RS256","kid":"r1"}"#),
            &base64url(br#"{"alg":"RS256","kid":"r2"}"#),
            1,
        );
        assert_eq!(v.verify(wrong_kid.as_bytes(), NOW), Err(JwtError::NoKey));
    }

    #[test]
    fn bad_key_sets_are_refused() {
        for jwks in [
            "nope",
            r#"{"keys":[]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AA"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}]}"#,
            r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS512"}]}"#,
        ] {
            assert!(
                JwtVerifier::from_jwks(jwks, "i", "a", "sub", 0).is_err(),
                "{jwks}"
            );
        }
    }
}
