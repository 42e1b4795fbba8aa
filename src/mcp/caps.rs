//! The server capabilities an upstream advertised in its initialize result, as the bits an
//! aggregate session token keeps for it, so that the aggregate endpoint asks each upstream only
//! for what it offers.

/// The bits are known (taken from an initialize result). Without it nothing is known, and
/// everything is asked for.
pub const KNOWN: u8 = 0x80;
pub const TOOLS: u8 = 1;
pub const PROMPTS: u8 = 2;
pub const RESOURCES: u8 = 4;
pub const COMPLETIONS: u8 = 8;
pub const LOGGING: u8 = 16;
pub const TASKS: u8 = 32;

/// The bits for the capability names of an initialize result's `capabilities` object.
pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> u8 {
    names.into_iter().fold(KNOWN, |bits, name| {
        bits | match name {
            "tools" => TOOLS,
            "prompts" => PROMPTS,
            "resources" => RESOURCES,
            "completions" => COMPLETIONS,
            "logging" => LOGGING,
            "tasks" => TASKS,
            _ => 0,
        }
    })
}

/// Whether an upstream with `bits` is to be asked for `capability` (yes when its bits are not
/// known).
pub fn offers(bits: u8, capability: u8) -> bool {
    bits & KNOWN == 0 || bits & capability != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bits_decide_unknown_ones_ask() {
        let tools_only = from_names(["tools", "experimental"]);
        assert!(offers(tools_only, TOOLS));
        assert!(!offers(tools_only, PROMPTS) && !offers(tools_only, RESOURCES));
        let all = from_names(["tools", "prompts", "resources", "completions", "logging"]);
        assert!(
            [TOOLS, PROMPTS, RESOURCES, COMPLETIONS, LOGGING]
                .iter()
                .all(|&c| offers(all, c))
        );
        // An upstream joined without its initialize result kept: ask it for everything.
        assert!(offers(0, PROMPTS));
        // Advertising nothing is known too.
        assert!(!offers(from_names([]), TOOLS));
    }
}
