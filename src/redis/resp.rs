//! RESP2, the Redis wire format: commands written as arrays of bulk strings, replies read
//! incrementally from a buffer. Replies come from another process, so their sizes and nesting
//! are bounded: a broken or hostile server gets a protocol error, never an allocation it chose.

use std::fmt;

/// Largest bulk string accepted in a reply (the limiter's replies are a few bytes).
pub const MAX_BULK: usize = 1024 * 1024;
/// Most elements in one reply array.
pub const MAX_ARRAY: usize = 1024;
/// Deepest nesting of arrays in a reply.
const MAX_DEPTH: usize = 4;
/// Longest line (a simple string, an error, a number).
const MAX_LINE: usize = 64 * 1024;

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Status(String),
    /// `-ERR ...`: the command failed (the message as Redis wrote it).
    Error(String),
    Int(i64),
    /// `$-1` is `Bulk(None)`.
    Bulk(Option<Vec<u8>>),
    /// `*-1` is `Array(None)`.
    Array(Option<Vec<Value>>),
}

impl Value {
    /// The integer an integer reply (or a bulk string holding one) carries.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            Value::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// The bytes a server sent are not RESP (or exceed a bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a Redis reply: {}", self.0)
    }
}

/// Appends one command (`args[0]` is its name) to `out`.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one reply from the start of `buf`: `Ok(None)` when it is not complete yet, else the
/// reply and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut at = 0;
    match value(buf, &mut at, 0)? {
        Some(v) => Ok(Some((v, at))),
        None => Ok(None),
    }
}

fn value(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Value>, ProtocolError> {
    let Some(line) = line(buf, *at)? else {
        return Ok(None);
    };
    let (kind, text) = (line[0], &line[1..]);
    let after_line = *at + line.len() + 2;
    let text_str = || {
        std::str::from_utf8(text)
            .map(str::to_owned)
            .map_err(|_| ProtocolError("a line that is not UTF-8".into()))
    };
    let number = || -> Result<i64, ProtocolError> {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ProtocolError(format!("bad number {:?}", String::from_utf8_lossy(text))))
    };
    let v = match kind {
        b'+' => Value::Status(text_str()?),
        b'-' => Value::Error(text_str()?),
        b':' => Value::Int(number()?),
        b'$' => {
            let n = number()?;
            if n < 0 {
                Value::Bulk(None)
            } else {
                let n = n as usize;
                if n > MAX_BULK {
                    return Err(ProtocolError(format!("a bulk string of {n} bytes")));
                }
                let end = after_line + n;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(ProtocolError("a bulk string not ended by CRLF".into()));
                }
                *at = end + 2;
                return Ok(Some(Value::Bulk(Some(buf[after_line..end].to_vec()))));
            }
        }
        b'*' => {
            let n = number()?;
            if n < 0 {
                Value::Array(None)
            } else {
                let n = n as usize;
                if n > MAX_ARRAY || depth >= MAX_DEPTH {
                    return Err(ProtocolError(format!("an array of {n} at depth {depth}")));
                }
                let mut items = Vec::with_capacity(n);
                let mut next = after_line;
                for _ in 0..n {
                    match value(buf, &mut next, depth + 1)? {
                        Some(v) => items.push(v),
                        None => return Ok(None),
                    }
                }
                *at = next;
                return Ok(Some(Value::Array(Some(items))));
            }
        }
        other => {
            return Err(ProtocolError(format!(
                "unexpected type byte {:?}",
                char::from(other)
            )));
        }
    };
    *at = after_line;
    Ok(Some(v))
}

/// The line at `at` without its CRLF; `None` when it is not complete.
fn line(buf: &[u8], at: usize) -> Result<Option<&[u8]>, ProtocolError> {
    let rest = &buf[at.min(buf.len())..];
    match memchr::memchr(b'\n', rest) {
        None if rest.len() > MAX_LINE => Err(ProtocolError("a line without an end".into())),
        None => Ok(None),
        Some(0) | Some(1) => Err(ProtocolError("an empty line".into())),
        Some(i) if rest[i - 1] != b'\r' => Err(ProtocolError("a line not ended by CRLF".into())),
        Some(i) => Ok(Some(&rest[..i - 1])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_command_as_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &[b"EVALSHA", b"ab", b"1", b"k\r\n"]);
        assert_eq!(
            out,
            b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn parses_every_kind_and_waits_for_the_rest() {
        let all = b"+OK\r\n-NOSCRIPT x\r\n:42\r\n$4\r\na\r\nb\r\n$-1\r\n*2\r\n:1\r\n*1\r\n:-7\r\n";
        let mut at = 0;
        let mut got = Vec::new();
        while at < all.len() {
            let (v, n) = parse(&all[at..]).unwrap().unwrap();
            got.push(v);
            at += n;
        }
        assert_eq!(
            got,
            vec![
                Value::Status("OK".into()),
                Value::Error("NOSCRIPT x".into()),
                Value::Int(42),
                Value::Bulk(Some(b"a\r\nb".to_vec())),
                Value::Bulk(None),
                Value::Array(Some(vec![
                    Value::Int(1),
                    Value::Array(Some(vec![Value::Int(-7)]))
                ])),
            ]
        );
        // Every strict prefix of a reply is incomplete, not an error.
        let reply = b"*2\r\n$5\r\nhello\r\n:3\r\n";
        for cut in 0..reply.len() {
            assert_eq!(parse(&reply[..cut]).unwrap(), None, "prefix {cut}");
        }
    }

    #[test]
    fn refuses_what_is_not_resp_or_too_big() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"+no cr\n",
            b"$3\r\nabcd\r\n",
            b"$99999999999\r\n",
            b"*999999\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let endless = vec![b'+'; MAX_LINE + 10];
        assert!(parse(&endless).is_err());
    }
}
