//! Allocation-free formatting for the request path and the audit writer, and which
//! characters a reader cannot see (what every writer of text for people escapes).

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends lowercase hex.
pub fn push_hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
}

/// Appends `n` in lowercase hex without leading zeros (a chunk size).
pub fn push_hex_len(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = DIGITS[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Why a character is hidden from a reader, if it is: invisible, reordering or a control
/// (tab, line feed and carriage return are not).
pub fn hidden(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{E0000}'..='\u{E007F}' => "tag character",
        '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{180E}' => {
            "zero-width character"
        }
        '\u{2061}'..='\u{2064}'
        | '\u{00AD}'
        | '\u{034F}'
        | '\u{17B4}'
        | '\u{17B5}'
        | '\u{180B}'..='\u{180D}'
        | '\u{206A}'..='\u{206F}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{1D173}'..='\u{1D17A}' => "invisible character",
        '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' => "invisible filler",
        '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}'
        | '\u{200E}'
        | '\u{200F}'
        | '\u{061C}' => "bidi control",
        '\u{E0100}'..='\u{E01EF}' => "variation selector",
        '\u{0}'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{7F}'..='\u{9F}' => {
            "control character"
        }
        _ => return None,
    })
}

/// `s` in double quotes, every character a reader would not see escaped, as JSON and TOML
/// strings both read it: `\"`, `\\`, `\n`, `\t`, `\r`, and each [`hidden`] character
/// written by `escape` (the formats spell a code point differently).
pub fn quoted(s: &str, escape: fn(char, &mut String)) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if hidden(c).is_some() => escape(c, &mut out),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An IP address as text, as `Display` writes it (IPv4 without the formatting machinery: it
/// goes into every forwarded request's `X-Forwarded-For`).
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_addresses_are_written_as_display_writes_them() {
        for ip in [
            "10.0.0.9",
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "fe80::1:2",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            super::push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    use super::*;

    #[test]
    fn formats() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        let mut out = Vec::new();
        push_hex(&[0x00, 0xab, 0xff], &mut out);
        assert_eq!(out, b"00abff");
        for n in [0usize, 9, 10, 255, 4096, usize::MAX] {
            let mut out = Vec::new();
            push_hex_len(&mut out, n);
            assert_eq!(out, format!("{n:x}").as_bytes());
        }
    }
}
