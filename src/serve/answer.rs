//! The one place a reply scopegate answers with is written to the agent.

use super::record::Draft;
use crate::http::conn::Conn;
use crate::mcp::jsonrpc::Id;
use crate::reply::Reply;

/// Whether the agent's connection carries another request.
#[derive(Clone, Copy)]
pub enum KeepAlive {
    Yes,
    No,
    /// No, after an error: once the request is recorded, the connection stops writing and
    /// drains what the agent still sends, briefly ([`ingress::linger_close`]), so that closing
    /// does not reset the answer away.
    Linger,
}

/// Writes a reply scopegate answers with, records it in the draft, and says whether the
/// connection goes on. The one place such replies are written.
pub async fn answer(
    draft: &mut Draft,
    client: &mut Conn,
    method: &[u8],
    id: Option<Id<'_>>,
    reply: &Reply,
    close: bool,
) -> Result<KeepAlive, ()> {
    let close = close || reply.close;
    draft.replied(reply);
    let (res, _) = client.write_all(reply.render(method, id, close)).await;
    res.map_err(|_| ())?;
    Ok(match (close, reply.status >= 400) {
        (false, _) => KeepAlive::Yes,
        (true, true) => KeepAlive::Linger,
        (true, false) => KeepAlive::No,
    })
}
