//! Practices that tried to connect without being paired: a small, bounded, de-duplicated
//! list kept in memory, which the console shows as "wants to connect" prompts (accepting
//! one pairs the practice through the ordinary pairing call).
//!
//! Owns: that list. Must not touch: the store, the pin set, the wire (the sync service
//! reports a refusal here; pairing itself is `Node::add_peer`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;

/// The most practices kept; the one seen longest ago goes first.
pub const MAX_PENDING: usize = 16;

/// One practice that tried to connect.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingPeer {
    pub id: String,
    /// The address its connection came from (its sync address when it dials from the port
    /// it listens on, which chartmeshd does), if known.
    pub addr: Option<String>,
    pub first_ms: i64,
    pub last_ms: i64,
    pub attempts: u64,
}

#[derive(Default)]
pub struct PendingPeers {
    list: Mutex<VecDeque<PendingPeer>>,
}

impl PendingPeers {
    /// Notes an attempt by `id` (from `addr`, when known) at `now_ms`.
    pub fn note(&self, id: &str, addr: Option<SocketAddr>, now_ms: i64) {
        let mut list = self.list.lock().unwrap();
        if let Some(i) = list.iter().position(|p| p.id == id) {
            let mut p = list.remove(i).expect("index is in range");
            p.last_ms = now_ms;
            p.attempts += 1;
            if let Some(a) = addr {
                p.addr = Some(a.to_string());
            }
            list.push_front(p);
            return;
        }
        if list.len() >= MAX_PENDING {
            list.pop_back();
        }
        list.push_front(PendingPeer {
            id: id.to_string(),
            addr: addr.map(|a| a.to_string()),
            first_ms: now_ms,
            last_ms: now_ms,
            attempts: 1,
        });
    }

    /// Forgets a practice (paired, or dismissed); true if it was listed.
    pub fn remove(&self, id: &str) -> bool {
        let mut list = self.list.lock().unwrap();
        let before = list.len();
        list.retain(|p| p.id != id);
        list.len() != before
    }

    /// The practices listed, most recent attempt first.
    pub fn list(&self) -> Vec<PendingPeer> {
        self.list.lock().unwrap().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_bounded_and_keeps_one_entry_per_practice() {
        let p = PendingPeers::default();
        let addr: SocketAddr = "127.0.0.1:7361".parse().unwrap();
        p.note("a", None, 1);
        p.note("a", Some(addr), 5);
        let l = p.list();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].first_ms, l[0].last_ms, l[0].attempts), (1, 5, 2));
        assert_eq!(l[0].addr.as_deref(), Some("127.0.0.1:7361"));
        for i in 0..(MAX_PENDING + 5) {
            p.note(&format!("p{i}"), None, 10 + i as i64);
        }
        let l = p.list();
        assert_eq!(l.len(), MAX_PENDING);
        assert_eq!(l[0].id, format!("p{}", MAX_PENDING + 4));
        assert!(!l.iter().any(|x| x.id == "a"), "the oldest went first");
        assert!(p.remove(&l[3].id));
        assert!(!p.remove(&l[3].id));
        assert_eq!(p.list().len(), MAX_PENDING - 1);
    }
}
