//! The pin file (`SCOPEGATE_PINS`): for each upstream tool and prompt, the digest of the
//! definition an operator reviewed, and that definition. A TOML file meant for review and
//! version control:
//!
//! ```toml
//! [[tool]]
//! upstream = "weather"
//! name = "get_weather"
//! digest = "sha256:3f1c…"
//! definition = "{\"description\":\"Get the weather.\",\"inputSchema\":{…},\"name\":\"get_weather\"}"
//! ```
//!
//! `definition` is the canonical JSON the digest was made from, kept for `scopegate tools
//! diff` and for the reviewer; hidden characters in it are written as `\uXXXX` escapes, so a
//! review sees them. A pin may leave `definition` out; when it has one, the two must agree.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{Digest, Kind, canonical, digest, digest_text, parse_digest};

/// One pinned definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    pub digest: Digest,
    /// The definition the digest was made from, when the file has it.
    pub definition: Option<Value>,
}

/// Where a pin belongs: upstream, kind, name.
pub type PinKey = (String, Kind, String);

/// Every pin of a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pins {
    map: BTreeMap<PinKey, Pin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tool: Vec<RawPin>,
    #[serde(default)]
    prompt: Vec<RawPin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPin {
    upstream: String,
    name: String,
    digest: String,
    definition: Option<String>,
}

impl Pins {
    /// Reads the pin file at `path` (errors leave the path for the caller to name).
    pub fn load(path: &Path) -> Result<Pins, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "pin file not found (write it with `scopegate tools pin`)".to_owned()
            } else {
                format!("pin file: {e}")
            }
        })?;
        Pins::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Pins, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut pins = Pins::default();
        for (kind, list) in [(Kind::Tool, raw.tool), (Kind::Prompt, raw.prompt)] {
            for p in list {
                let what = format!("{} {}/{}", kind.as_str(), p.upstream, p.name);
                let d = parse_digest(&p.digest).ok_or_else(|| {
                    format!("{what}: digest {:?} is not sha256:<64 hex>", p.digest)
                })?;
                let definition = match &p.definition {
                    None => None,
                    Some(text) => {
                        let v: Value = serde_json::from_str(text)
                            .map_err(|e| format!("{what}: definition is not JSON: {e}"))?;
                        if digest(&v) != d {
                            return Err(format!(
                                "{what}: the definition does not match the digest (edited by \
                                 hand? re-pin it with `scopegate tools approve`)"
                            ));
                        }
                        Some(v)
                    }
                };
                let key = (p.upstream, kind, p.name);
                if pins.map.contains_key(&key) {
                    return Err(format!("{what} is pinned twice"));
                }
                pins.map.insert(
                    key,
                    Pin {
                        digest: d,
                        definition,
                    },
                );
            }
        }
        Ok(pins)
    }

    pub fn get(&self, upstream: &str, kind: Kind, name: &str) -> Option<&Pin> {
        // BTreeMap lookups want the owned key shape; pins are looked up when a list is seen,
        // not per call.
        self.map.get(&(upstream.to_owned(), kind, name.to_owned()))
    }

    /// Pins `def` (a definition as [`super::definition`] makes it).
    pub fn set(&mut self, upstream: &str, kind: Kind, name: &str, def: &Value) {
        self.map.insert(
            (upstream.to_owned(), kind, name.to_owned()),
            Pin {
                digest: digest(def),
                definition: Some(def.clone()),
            },
        );
    }

    /// Drops every pin of `upstream` (before it is pinned whole again).
    pub fn remove_upstream(&mut self, upstream: &str) {
        self.map.retain(|(u, _, _), _| u != upstream);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PinKey, &Pin)> {
        self.map.iter()
    }

    /// The file's text: tools, then prompts, each by upstream and name.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# scopegate pins: the reviewed definition of each upstream tool and prompt.\n\
             # Written by `scopegate tools pin` and `scopegate tools approve`; review changes to it\n\
             # like code. A definition that no longer matches its digest is a drift (on_change).\n",
        );
        for kind in [Kind::Tool, Kind::Prompt] {
            for ((upstream, k, name), pin) in &self.map {
                if *k != kind {
                    continue;
                }
                out.push_str(&format!("\n[[{}]]\n", kind.as_str()));
                out.push_str(&format!("upstream = {}\n", toml_string(upstream)));
                out.push_str(&format!("name = {}\n", toml_string(name)));
                out.push_str(&format!("digest = \"{}\"\n", digest_text(&pin.digest)));
                if let Some(def) = &pin.definition {
                    out.push_str(&format!("definition = {}\n", toml_string(&canonical(def))));
                }
            }
        }
        out
    }

    /// Writes the file whole: to a temporary file beside it, then renamed over it, so a reader
    /// (a reload) never sees half of it.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }
}

/// A TOML basic string. Control and hidden characters are written as escapes, so what a
/// reviewer reads is all there is.
fn toml_string(s: &str) -> String {
    use std::fmt::Write as _;
    // TOML: `\uXXXX`, or `\UXXXXXXXX` past the basic plane.
    crate::fmt::quoted(s, |c, out| {
        let _ = match c as u32 {
            n @ ..=0xFFFF => write!(out, "\\u{n:04X}"),
            n => write!(out, "\\U{n:08X}"),
        };
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_the_same_and_shows_hidden_characters() {
        let mut pins = Pins::default();
        let def = serde_json::json!({
            "name": "get_weather",
            "description": "Weather \"now\"\\ \n\u{E0041}\u{200B} ✓",
            "inputSchema": { "type": "object" }
        });
        pins.set("weather", Kind::Tool, "get_weather", &def);
        let prompt = serde_json::json!({ "name": "p", "arguments": [] });
        pins.set("weather", Kind::Prompt, "p", &prompt);
        let text = pins.render();
        assert!(
            text.contains("\\U000E0041") && text.contains("\\u200B"),
            "{text}"
        );
        assert!(text.contains("✓"), "visible characters stay as they are");
        let back = Pins::parse(&text).unwrap();
        assert_eq!(back, pins);
        let pin = back.get("weather", Kind::Tool, "get_weather").unwrap();
        assert_eq!(pin.digest, digest(&def));
        assert!(
            back.get("weather", Kind::Tool, "p").is_none(),
            "kinds are apart"
        );
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        let def = serde_json::json!({ "name": "t", "description": "a" });
        let good = format!(
            "[[tool]]\nupstream = \"u\"\nname = \"t\"\ndigest = \"{}\"\n",
            digest_text(&digest(&def))
        );
        assert_eq!(
            Pins::parse(&good).unwrap().len(),
            1,
            "definition is optional"
        );
        let edited = format!("{good}definition = '{{\"name\":\"t\",\"description\":\"b\"}}'\n");
        assert!(Pins::parse(&edited).unwrap_err().contains("does not match"));
        let twice = format!("{good}{good}");
        assert!(Pins::parse(&twice).unwrap_err().contains("pinned twice"));
        assert!(
            Pins::parse("[[tool]]\nupstream = \"u\"\nname = \"t\"\ndigest = \"md5:1\"\n")
                .unwrap_err()
                .contains("not sha256")
        );
        assert!(
            Pins::parse("[[tool]]\nupstream = \"u\"\nname = \"t\"\ndigest = \"x\"\nextra = 1\n")
                .is_err()
        );
        let missing = Pins::load(Path::new("/nonexistent/pins.toml")).unwrap_err();
        assert!(missing.contains("scopegate tools pin"), "{missing}");
    }
}
