//! The running policy, replaceable on reload. Workers cache an `Arc` and compare a generation
//! number between requests (one atomic load of a word written only on reload); only a reload
//! touches the mutex. A request holds the policy through a per-worker `Rc`, so no reference
//! count shared between cores changes per request.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Policy;

pub struct LivePolicy {
    generation: AtomicU64,
    current: Mutex<Arc<Policy>>,
}

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy {
            generation: AtomicU64::new(1),
            current: Mutex::new(Arc::new(policy)),
        }
    }

    /// Installs a new policy; rate-limit buckets whose limit did not change keep their state.
    pub fn replace(&self, mut policy: Policy) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        policy.inherit_rate_state(&current);
        policy.integrity.inherit(&current.integrity);
        *current = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn snapshot(&self) -> Arc<Policy> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The policy as a request holds it. The `Rc` is the point: cloning it per request touches a
/// counter only this worker uses, where cloning the `Arc` would make every core write the same
/// shared reference count.
#[allow(clippy::redundant_allocation)]
pub type LocalPolicy = Rc<Arc<Policy>>;

/// A worker's view: the policy it serves with until the generation moves.
pub struct PolicyView {
    live: Arc<LivePolicy>,
    cached: RefCell<(u64, LocalPolicy)>,
}

impl PolicyView {
    pub fn new(live: Arc<LivePolicy>) -> PolicyView {
        let generation = live.generation.load(Ordering::Acquire);
        let policy = live.snapshot();
        PolicyView {
            live,
            cached: RefCell::new((generation, Rc::new(policy))),
        }
    }

    /// The current policy; called once per request, so a request sees one policy throughout.
    pub fn current(&self) -> LocalPolicy {
        let generation = self.live.generation.load(Ordering::Acquire);
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = (generation, Rc::new(self.live.snapshot()));
        }
        cached.1.clone()
    }
}

/// One agent's view of the policy, watched across reloads by a long-lived stream: checking
/// costs one atomic load until a reload happens.
pub struct ViewWatch {
    live: Arc<LivePolicy>,
    agent: String,
    generation: Cell<u64>,
    view: Cell<u64>,
}

/// What a reload did to an agent's view.
pub enum ViewChange {
    Same,
    /// What the agent may see changed: its lists should be fetched again, and what the stream
    /// relays from now on is filtered by this policy, where the agent has this index.
    Changed(Arc<Policy>, usize),
    /// The agent is gone from the policy: its streams end.
    Revoked,
}

/// How often an open stream looks at the policy (one atomic load unless it was reloaded).
pub const VIEW_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl ViewWatch {
    /// Watches agent `agent` of `policy` (the policy its stream was opened under).
    pub fn new(live: &Arc<LivePolicy>, policy: &Policy, agent: usize) -> ViewWatch {
        ViewWatch {
            live: live.clone(),
            agent: policy.agents[agent].id.clone(),
            // Not the generation now: `policy` may predate a reload that already happened, so
            // the first check compares against whatever is current.
            generation: Cell::new(0),
            view: Cell::new(policy.view_of(agent)),
        }
    }

    /// What changed since the last check.
    pub fn check(&self) -> ViewChange {
        let generation = self.live.generation.load(Ordering::Acquire);
        if generation == self.generation.get() {
            return ViewChange::Same;
        }
        self.generation.set(generation);
        let policy = self.live.snapshot();
        let Some(agent) = policy.agent_by_id(&self.agent) else {
            return ViewChange::Revoked;
        };
        let view = policy.view_of(agent);
        if view == self.view.replace(view) {
            ViewChange::Same
        } else {
            ViewChange::Changed(policy, agent)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    fn policy(allow: &str, with_bot: bool) -> Policy {
        let mut text = String::from(
            "[[upstream]]\nname = \"gh\"\nurl = \"http://127.0.0.1:9/mcp\"\n\n[[agent]]\nid = \"other\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"\nallow = [\"gh/*\"]\n",
        );
        if with_bot {
            text.push_str(&format!(
                "\n[[agent]]\nid = \"bot\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000002\"\nallow = [{allow}]\n"
            ));
        }
        let env = HashMap::<String, String>::new();
        Policy::parse(Path::new("p.toml"), &text, &[], &env).unwrap()
    }

    #[test]
    fn a_stream_learns_whether_a_reload_changed_what_its_agent_sees() {
        let first = policy("\"gh/read_*\"", true);
        let bot = first.agent_by_id("bot").unwrap();
        let live = Arc::new(LivePolicy::new(policy("\"gh/read_*\"", true)));
        let watch = ViewWatch::new(&live, &first, bot);
        assert!(matches!(watch.check(), ViewChange::Same));
        // Another agent's rules moved, and the file was saved again: nothing for this one.
        live.replace(policy("\"gh/read_*\"", true));
        assert!(matches!(watch.check(), ViewChange::Same));
        live.replace(policy("\"gh/read_*\", \"gh/write_*\"", true));
        match watch.check() {
            ViewChange::Changed(p, a) => assert_eq!(p.agents[a].id, "bot"),
            _ => panic!("the view changed"),
        }
        assert!(matches!(watch.check(), ViewChange::Same), "told once");
        live.replace(policy("", false));
        assert!(matches!(watch.check(), ViewChange::Revoked));
    }
}
