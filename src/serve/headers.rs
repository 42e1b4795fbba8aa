//! 2026-07-28 routing headers (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`): an intermediary may
//! route on them, the upstream executes the body, so they must agree (400, -32020).

use crate::http::head::Head;
use crate::mcp::envelope::{Envelope, Kind};
use crate::mcp::jsonrpc;
use crate::mcp::modern;
use crate::reply::Reply;

/// 2026-07-28 routing headers must agree with the body: the body is what executes, and an
/// intermediary may route on the headers. A 2026-07-28 request must carry `Mcp-Method` (and
/// `Mcp-Name` for a call, a prompt or a read). `Mcp-Param-*` headers may each appear once with
/// a well-formed value; whether they match the arguments the upstream checks, which knows the
/// tool's schema and gets the arguments byte for byte. Refusals use the revision's code.
pub fn check_envelope_headers(head: &Head, env: &Envelope<'_>, body: &[u8]) -> Result<(), Reply> {
    let mismatch = |what: String| Reply::error(400, jsonrpc::HEADER_MISMATCH, what);
    let version = head.get("mcp-protocol-version");
    let modern_version = version.is_some_and(modern::is_modern);
    let method_header = head.get("mcp-method");
    let name_header = head.get("mcp-name");
    let is_param = modern::is_param_header;
    let has_params = head.iter().any(|(n, _)| is_param(n));
    if !modern_version
        && method_header.is_none()
        && name_header.is_none()
        && !has_params
        // A repeated version header is looked for only when there is one.
        && (version.is_none() || head.count("mcp-protocol-version") < 2)
    {
        return Ok(());
    }
    for name in ["mcp-protocol-version", "mcp-method", "mcp-name"] {
        if head.count(name) > 1 {
            return Err(mismatch(format!(
                "the {name} header appears more than once"
            )));
        }
    }
    if has_params {
        let params: Vec<(&[u8], &[u8])> = head.iter().filter(|(n, _)| is_param(n)).collect();
        for (i, (name, value)) in params.iter().enumerate() {
            let shown = String::from_utf8_lossy(name);
            if params[..i]
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
            {
                return Err(mismatch(format!(
                    "the {shown} header appears more than once"
                )));
            }
            if modern::decode_header_value(value).is_none() {
                return Err(mismatch(format!(
                    "the {shown} header carries a malformed base64 sentinel"
                )));
            }
        }
    }
    let Some(message) = env.single() else {
        return match method_header.or(name_header) {
            Some(_) => Err(mismatch("Mcp-Method/Mcp-Name on a batch".into())),
            None => Ok(()),
        };
    };
    let request = message.kind == Kind::Request;
    // The revision the body names (2026-07-28 `_meta`) is the header's.
    if modern_version {
        let path = ["params", "_meta", "io.modelcontextprotocol/protocolVersion"];
        let in_body = crate::aggregate::json::locate(body, &path)
            .and_then(|(a, b)| serde_json::from_slice::<String>(&body[a..b]).ok());
        if in_body.is_some_and(|v| Some(v.as_bytes()) != version) {
            return Err(mismatch(
                "the MCP-Protocol-Version header does not match the body's protocol version".into(),
            ));
        }
    }
    match (method_header, message.method) {
        (Some(h), Some(m)) if h == m.as_bytes() => {}
        (Some(_), _) => {
            return Err(mismatch(
                "the Mcp-Method header does not match the body's method".into(),
            ));
        }
        (None, Some(m)) if modern_version && request => {
            return Err(mismatch(format!(
                "a {} request must carry an Mcp-Method header ({m:?})",
                modern::LATEST
            )));
        }
        (None, _) => {}
    }
    let named = message.method.and_then(modern::name_field);
    let in_body = match named {
        Some("uri") => message.uri,
        Some(_) => message.name,
        None => message.name.or(message.uri),
    };
    match (name_header, in_body) {
        (Some(h), Some(b)) => {
            if modern::decode_header_value(h).as_deref() != Some(b.as_bytes()) {
                return Err(mismatch(
                    "the Mcp-Name header does not match the body's name".into(),
                ));
            }
        }
        (Some(_), None) => {
            return Err(mismatch(
                "an Mcp-Name header on a message that names nothing".into(),
            ));
        }
        (None, Some(_)) if modern_version && request && named.is_some() => {
            return Err(mismatch(format!(
                "a {} {} request must carry an Mcp-Name header",
                modern::LATEST,
                message.method.unwrap_or_default()
            )));
        }
        (None, _) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::request_head as head;
    use crate::mcp::envelope::EnvelopeParser;

    #[test]
    fn routing_headers_must_agree_with_the_body() {
        let mut parser = EnvelopeParser::new();
        const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
        let env = parser.parse(BODY).unwrap();
        let check = |extra: &str| {
            check_envelope_headers(
                &head(&format!("POST /mcp HTTP/1.1\r\nHost: x\r\n{extra}\r\n")),
                &env,
                BODY,
            )
            .map_err(|r| r.status)
        };
        assert_eq!(check(""), Ok(()));
        assert_eq!(
            check("Mcp-Method: tools/call\r\nMcp-Name: echo\r\n"),
            Ok(())
        );
        assert_eq!(check("Mcp-Method: tools/list\r\n"), Err(400));
        assert_eq!(check("Mcp-Name: delete\r\n"), Err(400));
        assert_eq!(check("Mcp-Name: echo\r\nMcp-Name: echo\r\n"), Err(400));
        // The revision's code, and its rules for a 2026-07-28 request.
        let code = |extra: &str| {
            let r = check_envelope_headers(
                &head(&format!("POST /mcp HTTP/1.1\r\nHost: x\r\n{extra}\r\n")),
                &env,
                BODY,
            )
            .unwrap_err();
            let v: serde_json::Value = serde_json::from_slice(&r.body_bytes(None)).unwrap();
            (r.status, v["error"]["code"].as_i64().unwrap())
        };
        assert_eq!(code("Mcp-Method: tools/list\r\n"), (400, -32020));
        let v = "MCP-Protocol-Version: 2026-07-28\r\n";
        assert_eq!(code(v), (400, -32020), "Mcp-Method is required");
        assert_eq!(
            code(&format!("{v}Mcp-Method: tools/call\r\n")),
            (400, -32020),
            "Mcp-Name is required on a call"
        );
        assert_eq!(
            check(&format!("{v}Mcp-Method: tools/call\r\nMcp-Name: echo\r\n")),
            Ok(())
        );
        assert_eq!(
            check(&format!(
                "{v}Mcp-Method: tools/call\r\nMcp-Name: =?base64?ZWNobw==?=\r\n"
            )),
            Ok(()),
            "a sentinel-encoded name is decoded"
        );
        let call = format!("{v}Mcp-Method: tools/call\r\nMcp-Name: echo\r\n");
        assert_eq!(check(&format!("{call}Mcp-Param-Region: eu\r\n")), Ok(()));
        assert_eq!(
            code(&format!(
                "{call}Mcp-Param-Region: eu\r\nmcp-param-region: us\r\n"
            )),
            (400, -32020)
        );
        assert_eq!(
            code(&format!("{call}Mcp-Param-Region: =?base64?!?=\r\n")),
            (400, -32020)
        );
        // The header's revision must be the body's.
        let later = call.replace("2026-07-28", "2027-01-01");
        assert_eq!(code(&later), (400, -32020));
        assert_eq!(
            code("MCP-Protocol-Version: 2025-06-18\r\nMCP-Protocol-Version: 2026-07-28\r\n"),
            (400, -32020),
            "a repeated version header"
        );
    }
}
