//! Base64url (RFC 4648 §5, no padding) for session tokens, generated keys and JWTs; standard
//! padded base64 (§4) for HTTP Basic credentials.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64url(data: &[u8]) -> String {
    encode(data, ALPHABET, false)
}

/// Standard base64 with `=` padding.
pub fn base64(data: &[u8]) -> String {
    encode(data, STANDARD, true)
}

fn encode(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if pad {
            for _ in chars..4 {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes unpadded base64url; `None` on any other character or an impossible length.
pub fn base64url_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    base64url_decode_into(text, &mut out).then_some(out)
}

/// Decodes into `out` (cleared first; its allocation reused). False on invalid input.
pub fn base64url_decode_into(text: &[u8], out: &mut Vec<u8>) -> bool {
    decode_into(text, ALPHABET, out)
}

/// Decodes standard padded base64, in its canonical form only (the form [`base64`] writes):
/// `None` for anything else, so two readers can never decode one text differently.
pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let unpadded = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    (decode_into(unpadded.unwrap_or(text), STANDARD, &mut out) && base64(&out).as_bytes() == text)
        .then_some(out)
}

fn decode_into(text: &[u8], alphabet: &[u8; 64], out: &mut Vec<u8>) -> bool {
    out.clear();
    if text.len() % 4 == 1 {
        return false;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            _ if c == alphabet[62] => 62,
            _ if c == alphabet[63] => 63,
            _ => return None,
        } as u32)
    };
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let Some(v) = value(c) else {
                return false;
            };
            n |= v << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        for i in 0..bytes {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        for n in 0..70u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64url_decode(base64url(&data).as_bytes()).unwrap(), data);
        }
        assert!(base64url_decode(b"Zm9v+").is_none());
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert!(base64url_decode(b"Z").is_none());
    }

    #[test]
    fn standard_decoding_takes_the_canonical_form_only() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(91)).collect();
            assert_eq!(base64_decode(base64(&data).as_bytes()).unwrap(), data);
        }
        assert_eq!(base64_decode(b"+/8=").unwrap(), [0xfb, 0xff]);
        // Unpadded, padding in the middle, the url alphabet, non-zero trailing bits.
        for bad in [&b"Zg"[..], b"Zg==Zg==", b"-_8=", b"Zh==", b"Zg=", b"Z==="] {
            assert!(base64_decode(bad).is_none(), "{bad:?}");
        }
    }
}
