//! Message body framing (RFC 9112 §6): which body a head announces, and the chunked coding.

use bytes::{BufMut, BytesMut};

use super::head::Head;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Responses only: the body runs until the upstream closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// Both `Content-Length` and `Transfer-Encoding`: a request smuggling vector (RFC 9112
    /// §6.3 rule 3); refused rather than guessed.
    LengthAndChunked,
    /// Several `Content-Length` values that differ, or one that is not a decimal number.
    BadLength,
    /// A transfer coding other than a final `chunked` (RFC 9112 §6.1: 501).
    UnsupportedTransferEncoding,
}

impl FramingError {
    pub fn message(self) -> &'static str {
        match self {
            FramingError::LengthAndChunked => {
                "request has both Content-Length and Transfer-Encoding"
            }
            FramingError::BadLength => "invalid or conflicting Content-Length",
            FramingError::UnsupportedTransferEncoding => {
                "unsupported Transfer-Encoding (only chunked is accepted)"
            }
        }
    }
}

/// The framing a request head announces. Requests without either header have no body.
pub fn request_framing(head: &Head) -> Result<Framing, FramingError> {
    let te = transfer_encoding(head)?;
    let cl = content_length(head)?;
    match (te, cl) {
        (true, Some(_)) => Err(FramingError::LengthAndChunked),
        (true, None) => Ok(Framing::Chunked),
        (false, Some(0)) | (false, None) => Ok(Framing::Empty),
        (false, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// The framing of a response to a request with method `method` (RFC 9112 §6.3).
pub fn response_framing(head: &Head, method: &[u8]) -> Result<Framing, FramingError> {
    if method == b"HEAD" || (100..200).contains(&head.status) || matches!(head.status, 204 | 304) {
        return Ok(Framing::Empty);
    }
    let te = transfer_encoding(head)?;
    if te {
        // A response with both uses chunked and ignores the length (RFC 9112 §6.3 rule 3);
        // we re-frame, so the stray Content-Length is dropped rather than relayed.
        return Ok(Framing::Chunked);
    }
    match content_length(head)? {
        Some(0) => Ok(Framing::Empty),
        Some(n) => Ok(Framing::Length(n)),
        None => Ok(Framing::UntilClose),
    }
}

/// `Ok(true)` when the message is chunked. Any other coding is refused: we would have to
/// decode it to find the body's end.
fn transfer_encoding(head: &Head) -> Result<bool, FramingError> {
    let mut seen = false;
    let mut chunked_last = false;
    for (_, value) in head
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"transfer-encoding"))
    {
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            seen = true;
            if chunked_last {
                // `chunked` must be the final coding, applied once.
                return Err(FramingError::UnsupportedTransferEncoding);
            }
            if coding.eq_ignore_ascii_case(b"chunked") {
                chunked_last = true;
            } else {
                return Err(FramingError::UnsupportedTransferEncoding);
            }
        }
    }
    if seen && !chunked_last {
        return Err(FramingError::UnsupportedTransferEncoding);
    }
    Ok(seen)
}

/// The `Content-Length`, if any. Repeated fields or comma lists are accepted only when every
/// value is the same number (RFC 9112 §6.3 rule 5).
fn content_length(head: &Head) -> Result<Option<u64>, FramingError> {
    let mut found: Option<u64> = None;
    for (_, value) in head
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
    {
        for part in value.split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(FramingError::BadLength)?;
            match found {
                Some(prev) if prev != n => return Err(FramingError::BadLength),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    // Digits only: no sign, no whitespace inside, at most 18 digits (no overflow).
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Longest chunk-size line we accept (size digits plus extensions), in the spirit of a
/// "partial chunk head" limit: chunk extensions are unused by MCP and otherwise unbounded.
pub const MAX_CHUNK_LINE: usize = 1024;

/// Most bytes of trailer fields after the last chunk.
pub const MAX_TRAILERS: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    BadSize,
    LineTooLong,
    BadDelimiter,
    TrailersTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` counts them.
    Size {
        digits: u8,
    },
    /// In chunk extensions, up to CR.
    Extension,
    /// Saw CR after the size line, want LF.
    SizeLf,
    Data,
    /// After data, want CR then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR of a trailer line, want LF.
    TrailerLf,
    /// Saw CR of the final empty line, want LF.
    EndLf,
    Done,
}

/// Incremental `chunked` decoder. Feed it bytes in pieces of any size; it writes the decoded
/// data to `out` (when given) and reports how much input it consumed, stopping right after the
/// final CRLF so the caller knows where the next message starts.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    remaining: u64,
    line_len: usize,
    trailer_len: usize,
    decoded: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            remaining: 0,
            line_len: 0,
            trailer_len: 0,
            decoded: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Between chunks: what was fed so far ends with a whole chunk (or nothing), so a last
    /// chunk written now ends the body properly.
    pub fn between_chunks(&self) -> bool {
        self.state == State::Size { digits: 0 }
    }

    /// Total data bytes decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Consumes from `input`; returns how many bytes were consumed. Fewer than `input.len()`
    /// only when the body ended (`is_done()`).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut out: Option<&mut BytesMut>,
    ) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size { digits } => {
                    if let Some(v) = hex_value(b) {
                        // 15 hex digits is already 2^60 bytes; refuse before overflow.
                        if digits >= 15 {
                            return Err(ChunkedError::BadSize);
                        }
                        self.remaining = self.remaining * 16 + u64::from(v);
                        self.state = State::Size { digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(ChunkedError::BadSize);
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Extension;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else {
                        return Err(ChunkedError::BadSize);
                    }
                    self.bump_line()?;
                    i += 1;
                }
                State::Extension => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.bump_line()?;
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.line_len = 0;
                    self.state = if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                    i += 1;
                }
                State::Data => {
                    let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                    if let Some(out) = out.as_deref_mut() {
                        out.put_slice(&input[i..i + take]);
                    }
                    self.remaining -= take as u64;
                    self.decoded += take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.state = State::Size { digits: 0 };
                    i += 1;
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                    self.bump_trailer()?;
                    i += 1;
                }
                State::TrailerLine => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    }
                    self.bump_trailer()?;
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.state = State::TrailerStart;
                    self.bump_trailer()?;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    self.state = State::Done;
                    i += 1;
                    return Ok(i);
                }
                State::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    fn bump_line(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(ChunkedError::LineTooLong);
        }
        Ok(())
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkedError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILERS {
            return Err(ChunkedError::TrailersTooLarge);
        }
        Ok(())
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Writes `data` as one chunk of the chunked coding.
pub fn encode_chunk(data: &[u8], out: &mut BytesMut) {
    if data.is_empty() {
        return;
    }
    use std::fmt::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The last chunk with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;

    #[test]
    fn request_framing_rules() {
        let f = |extra: &str| request_framing(&head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")));
        assert_eq!(f(""), Ok(Framing::Empty));
        assert_eq!(f("Content-Length: 12\r\n"), Ok(Framing::Length(12)));
        assert_eq!(
            f("Content-Length: 12\r\nContent-Length: 12\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(f("Content-Length: 12, 12\r\n"), Ok(Framing::Length(12)));
        assert_eq!(
            f("Content-Length: 12\r\nContent-Length: 13\r\n"),
            Err(FramingError::BadLength)
        );
        assert_eq!(f("Content-Length: +12\r\n"), Err(FramingError::BadLength));
        assert_eq!(f("Content-Length: 0x10\r\n"), Err(FramingError::BadLength));
        assert_eq!(f("Transfer-Encoding: chunked\r\n"), Ok(Framing::Chunked));
        assert_eq!(f("Transfer-Encoding: CHUNKED\r\n"), Ok(Framing::Chunked));
        assert_eq!(
            f("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            Err(FramingError::LengthAndChunked)
        );
        assert_eq!(
            f("Transfer-Encoding: gzip, chunked\r\n"),
            Err(FramingError::UnsupportedTransferEncoding)
        );
        assert_eq!(
            f("Transfer-Encoding: chunked, identity\r\n"),
            Err(FramingError::UnsupportedTransferEncoding)
        );
        assert_eq!(
            f("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            Err(FramingError::UnsupportedTransferEncoding)
        );
    }

    fn decode_whole(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut d = ChunkedDecoder::default();
        let mut out = BytesMut::new();
        let n = d.feed(input, Some(&mut out))?;
        assert!(d.is_done(), "not done after {input:?}");
        Ok((out.to_vec(), n))
    }

    #[test]
    fn chunked_basics() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\nNEXT";
        let (out, n) = decode_whole(body).unwrap();
        assert_eq!(out, b"hello, world");
        assert_eq!(&body[n..], b"NEXT");
        let (out, _) = decode_whole(b"A\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n").unwrap();
        assert_eq!(out, b"0123456789");
    }

    #[test]
    fn chunked_rejects_bad_input() {
        let bad: [&[u8]; 7] = [
            b"x\r\n",
            b"\r\n",
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"fffffffffffffffff\r\n",
            b"3\r\nabc\r\n0\r\n\rX",
            b"-1\r\n",
        ];
        for input in bad {
            let mut d = ChunkedDecoder::default();
            assert!(d.feed(input, None).is_err(), "accepted {input:?}");
        }
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_LINE + 10, b'a');
        assert_eq!(
            ChunkedDecoder::default().feed(&long, None),
            Err(ChunkedError::LineTooLong)
        );
    }

    /// The same body split in two at every byte boundary, and fed a byte at a time, decodes
    /// to the same bytes and stops at the same place.
    #[test]
    fn chunked_split_at_every_boundary() {
        let body: &[u8] =
            b"4\r\nWiki\r\n5;a=b\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: v\r\n\r\nrest";
        let (expect, end) = decode_whole(body).unwrap();
        for split in 0..=body.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = BytesMut::new();
            let a = d.feed(&body[..split], Some(&mut out)).unwrap();
            let consumed = if d.is_done() {
                a
            } else {
                assert_eq!(a, split);
                a + d.feed(&body[split..], Some(&mut out)).unwrap()
            };
            assert!(d.is_done(), "split {split}");
            assert_eq!(consumed, end, "split {split}");
            assert_eq!(out.to_vec(), expect, "split {split}");
        }
        let mut d = ChunkedDecoder::default();
        let mut out = BytesMut::new();
        let mut consumed = 0;
        for b in body.chunks(1) {
            if d.is_done() {
                break;
            }
            consumed += d.feed(b, Some(&mut out)).unwrap();
        }
        assert_eq!(consumed, end);
        assert_eq!(out.to_vec(), expect);
        assert_eq!(d.decoded(), expect.len() as u64);
    }

    #[test]
    fn encode_roundtrip() {
        let mut enc = BytesMut::new();
        encode_chunk(b"data: x\n\n", &mut enc);
        encode_chunk(b"", &mut enc);
        enc.extend_from_slice(LAST_CHUNK);
        let (out, n) = decode_whole(&enc).unwrap();
        assert_eq!(out, b"data: x\n\n");
        assert_eq!(n, enc.len());
    }
}
