//! Liveness, claim failover and the local lease.
//!
//! Every node sends a heartbeat to the leader every `heartbeat_ms`. The leader remembers when it
//! last heard from each node, in memory only; when it becomes leader it starts every node at
//! "seen now" (a fresh grace period). When a node that owns claims has not been seen for
//! `claim_timeout`, the leader writes `ReleaseNode` for it.
//!
//! **Fencing.** A partitioned owner must stop serving its pools before another node can own them.
//! Each node keeps a lease base `b`: a point in its own clock no later than the last moment a
//! leader with a quorum behind it had heard from it. The leader confirms its own leadership with a
//! quorum round (`Raft::is_leader`) each tick and keeps `q`, the send time of the last confirmed
//! round; a heartbeat reply carries `now - q` as `quorum_age_ms`, and the follower sets
//! `b = sent - quorum_age_ms` (its send time precedes the leader's reply, so `b <= q`); the leader
//! itself uses `b = q`. Any leader that releases this node's claims either saw it last after `b`
//! and waits `claim_timeout` from then, or was elected after `q` (a quorum still followed the old
//! leader at `q`) and waits `claim_timeout` from its election. Either way no release commits
//! before `b + claim_timeout`, while [`Liveness::lease_valid`] turns false at
//! `b + claim_timeout / 2`: the owner fences itself with half the timeout to spare, which covers
//! clock-rate drift and the time to stop its pools. A stale leader that lost its quorum stops
//! being able to confirm `q`, so it cannot keep a partitioned follower's lease alive.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

#[derive(Default)]
struct State {
    /// The term in which this node leads, and since when.
    leading: Option<(u64, Instant)>,
    /// Leader view: when each node was last heard from in this term.
    seen: HashMap<NodeId, Instant>,
    /// Leader: send time of the last quorum-confirmed round.
    quorum_at: Option<Instant>,
    /// The local lease base.
    lease_base: Option<Instant>,
}

/// In-memory liveness state of one node.
#[derive(Default)]
pub struct Liveness {
    state: Mutex<State>,
}

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record whether this node leads in `term` (from raft metrics); a new term resets the view.
    pub fn set_leading(&self, term: Option<u64>) {
        let mut st = self.lock();
        match (term, st.leading) {
            (Some(t), Some((cur, _))) if t == cur => {}
            (Some(t), _) => {
                st.leading = Some((t, Instant::now()));
                st.seen.clear();
                st.quorum_at = None;
            }
            (None, _) => {
                st.leading = None;
                st.seen.clear();
                st.quorum_at = None;
            }
        }
    }

    /// Leader: a quorum round sent at `sent` succeeded.
    pub fn quorum_confirmed(&self, sent: Instant) {
        let mut st = self.lock();
        if st.leading.is_some() {
            st.quorum_at = Some(st.quorum_at.map_or(sent, |q| q.max(sent)));
            st.lease_base = Some(st.lease_base.map_or(sent, |b| b.max(sent)));
        }
    }

    /// Leader: `node` sent a heartbeat. Returns the age of the last quorum confirmation, or `None`
    /// when this node cannot vouch for its leadership (then the heartbeat is not acknowledged).
    pub fn heard_from(&self, node: NodeId) -> Option<Duration> {
        let mut st = self.lock();
        st.leading?;
        let q = st.quorum_at?;
        st.seen.insert(node, Instant::now());
        Some(q.elapsed())
    }

    /// Follower: the leader acknowledged a heartbeat sent at `sent`.
    pub fn acked(&self, sent: Instant, quorum_age: Duration) {
        let base = sent.checked_sub(quorum_age).unwrap_or(sent);
        let mut st = self.lock();
        st.lease_base = Some(st.lease_base.map_or(base, |b| b.max(base)));
    }

    /// Whether this node may keep serving the pools it owns.
    pub fn lease_valid(&self, claim_timeout: Duration) -> bool {
        self.lock()
            .lease_base
            .is_some_and(|b| b.elapsed() < claim_timeout / 2)
    }

    /// Leader view: time since each of `nodes` was last heard from (or since this term began).
    pub fn since_seen(
        &self,
        nodes: impl IntoIterator<Item = NodeId>,
    ) -> Option<HashMap<NodeId, Duration>> {
        let st = self.lock();
        let (_, since) = st.leading?;
        Some(
            nodes
                .into_iter()
                .map(|n| {
                    (
                        n,
                        st.seen
                            .get(&n)
                            .copied()
                            .unwrap_or(since)
                            .max(since)
                            .elapsed(),
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_needs_an_ack_and_expires_at_half_the_timeout() {
        let l = Liveness::default();
        let t = Duration::from_millis(1000);
        assert!(!l.lease_valid(t));
        l.acked(Instant::now(), Duration::from_millis(100));
        assert!(l.lease_valid(t));
        l.acked(Instant::now(), Duration::from_millis(0));
        let old = Instant::now().checked_sub(Duration::from_millis(600));
        let l2 = Liveness::default();
        if let Some(old) = old {
            l2.acked(old, Duration::ZERO);
            assert!(!l2.lease_valid(t));
        }
    }

    #[test]
    fn follower_heartbeat_is_not_acked_without_quorum() {
        let l = Liveness::default();
        assert!(l.heard_from(2).is_none());
        l.set_leading(Some(3));
        assert!(l.heard_from(2).is_none());
        l.quorum_confirmed(Instant::now());
        assert!(l.heard_from(2).is_some());
        // A new term resets the view and the quorum confirmation.
        l.set_leading(Some(4));
        assert!(l.heard_from(2).is_none());
    }
}
