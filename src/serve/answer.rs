//! The one place a reply scopegate answers with is written to the agent.

use super::ingress;
use super::record::Draft;
use crate::http::conn::Conn;
use crate::mcp::jsonrpc::Id;
use crate::reply::Reply;

/// Whether the agent's connection carries another request.
#[derive(Clone, Copy)]
pub enum KeepAlive {
    Yes,
    No,
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
    if close {
        if reply.status >= 400 {
            ingress::linger_close(client).await;
        }
        return Ok(KeepAlive::No);
    }
    Ok(KeepAlive::Yes)
}
