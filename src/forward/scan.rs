//! The `isError` of a relayed tools/call result, found without parsing the body.

/// Finds a result's `"isError": true|false` in a relayed body, piece by piece, without parsing
/// it: in JSON text an unescaped `"isError"` followed by `:` can only be a key. The last
/// `PATTERN_CARRY` bytes of each piece are kept so a key split across reads is still found.
#[derive(Default)]
pub struct IsErrorScan {
    pub found: Option<bool>,
    carry: Vec<u8>,
}

const PATTERN_CARRY: usize = 24;

impl IsErrorScan {
    pub fn reset(&mut self) {
        self.found = None;
        self.carry.clear();
    }

    pub fn feed(&mut self, piece: &[u8]) {
        if self.found.is_some() || piece.is_empty() {
            return;
        }
        // The boundary: the end of the last piece with the start of this one.
        if !self.carry.is_empty() {
            let take = piece.len().min(PATTERN_CARRY);
            self.carry.extend_from_slice(&piece[..take]);
            if let Some(v) = Self::scan(&self.carry) {
                self.found = Some(v);
                return;
            }
        }
        if let Some(v) = Self::scan(piece) {
            self.found = Some(v);
            return;
        }
        self.carry.clear();
        self.carry
            .extend_from_slice(&piece[piece.len().saturating_sub(PATTERN_CARRY)..]);
    }

    fn scan(data: &[u8]) -> Option<bool> {
        // Built once: `memmem::find` would build (and allocate) a searcher on every call.
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"isError\""));
        let mut from = 0;
        while let Some(i) = FINDER.find(&data[from..]) {
            let mut j = from + i + 9;
            while j < data.len() && matches!(data[j], b' ' | b'\t' | b'\r' | b'\n') {
                j += 1;
            }
            if data.get(j) == Some(&b':') {
                j += 1;
                while j < data.len() && matches!(data[j], b' ' | b'\t' | b'\r' | b'\n') {
                    j += 1;
                }
                if data[j..].starts_with(b"true") {
                    return Some(true);
                }
                if data[j..].starts_with(b"false") {
                    return Some(false);
                }
            }
            from += i + 9;
        }
        None
    }
}
