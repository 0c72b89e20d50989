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
//!
//! **Healing.** A node whose claims were released while it was cut off still finds them in its
//! own applied state until it has caught up with the log; a renewed lease alone would let it
//! serve those pools next to their new owner. So a heartbeat reply also carries the leader's
//! applied index `a`, and an acknowledgement moves the lease base only once this node has applied
//! (and published to its shards) the log up to `a` itself; until then it waits in a short queue.
//! The leader marks a silent node as *releasing* in the same locked step in which it decides to
//! release it, and acknowledges none of its heartbeats until the release is applied (or failed):
//! every later acknowledgement carries an `a` at or past the release, so the lease comes back only
//! once the node's shards know the claims are gone. In steady state a follower is at most a raft
//! heartbeat behind, so waiting acknowledgements cost nothing but that delay.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// Acknowledgements kept while this node catches up (older ones are dropped first).
const MAX_PENDING_ACKS: usize = 8;

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
    /// Acknowledgements (lease base, leader's applied index) waiting for this node to apply that
    /// index (see "Healing"), oldest first.
    pending: std::collections::VecDeque<(Instant, u64)>,
    /// Leader: nodes whose claims are being released (their heartbeats are not acknowledged).
    releasing: HashSet<NodeId>,
}

/// Why a leader does not acknowledge a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAck {
    /// This node does not lead, or has not confirmed its quorum in this term.
    NotLeader,
    /// The sender's claims are being released.
    Releasing,
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

    /// Leader: `node` sent a heartbeat. Returns the age of the last quorum confirmation, or why
    /// the heartbeat is not acknowledged.
    pub fn heard_from(&self, node: NodeId) -> Result<Duration, NoAck> {
        let mut st = self.lock();
        let q = match (st.leading, st.quorum_at) {
            (Some(_), Some(q)) => q,
            _ => return Err(NoAck::NotLeader),
        };
        if st.releasing.contains(&node) {
            return Err(NoAck::Releasing);
        }
        st.seen.insert(node, Instant::now());
        Ok(q.elapsed())
    }

    /// Follower: the leader acknowledged a heartbeat sent at `sent`, having applied the log up to
    /// `leader_applied`. It counts once this node has applied that much (see "Healing").
    pub fn acked(&self, sent: Instant, quorum_age: Duration, leader_applied: u64) {
        let base = sent.checked_sub(quorum_age).unwrap_or(sent);
        let mut st = self.lock();
        if st.pending.len() >= MAX_PENDING_ACKS {
            st.pending.pop_front();
        }
        st.pending.push_back((base, leader_applied));
    }

    /// Whether this node, having applied (and published) the log up to `applied`, may keep
    /// serving the pools it owns.
    pub fn lease_valid(&self, claim_timeout: Duration, applied: u64) -> bool {
        let mut st = self.lock();
        if st.pending.iter().any(|(_, a)| *a <= applied) {
            let mut base = st.lease_base;
            st.pending.retain(|&(b, a)| {
                if a <= applied {
                    base = Some(base.map_or(b, |x| x.max(b)));
                }
                a > applied
            });
            st.lease_base = base;
        }
        st.lease_base
            .is_some_and(|b| b.elapsed() < claim_timeout / 2)
    }

    /// Leader: which of `owners` have been silent for `claim_timeout` (or since this term
    /// began), marking them as releasing; none already releasing is returned again.
    pub fn take_silent(
        &self,
        owners: impl IntoIterator<Item = NodeId>,
        claim_timeout: Duration,
    ) -> Vec<(NodeId, Duration)> {
        let mut st = self.lock();
        let Some((_, since)) = st.leading else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in owners {
            let silent = st
                .seen
                .get(&n)
                .copied()
                .unwrap_or(since)
                .max(since)
                .elapsed();
            if silent >= claim_timeout && st.releasing.insert(n) {
                out.push((n, silent));
            }
        }
        out
    }

    /// Leader: the release of `node`'s claims is applied here (or failed).
    pub fn released(&self, node: NodeId) {
        self.lock().releasing.remove(&node);
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
        assert!(!l.lease_valid(t, 0));
        l.acked(Instant::now(), Duration::from_millis(100), 0);
        assert!(l.lease_valid(t, 0));
        l.acked(Instant::now(), Duration::from_millis(0), 0);
        let old = Instant::now().checked_sub(Duration::from_millis(600));
        let l2 = Liveness::default();
        if let Some(old) = old {
            l2.acked(old, Duration::ZERO, 0);
            assert!(!l2.lease_valid(t, 0));
        }
    }

    #[test]
    fn an_ack_counts_once_the_leaders_applied_index_is_reached() {
        let l = Liveness::default();
        let t = Duration::from_millis(1000);
        l.acked(Instant::now(), Duration::ZERO, 7);
        assert!(!l.lease_valid(t, 6), "behind the leader's applied index");
        assert!(l.lease_valid(t, 7));
        // A valid lease stays valid while a newer ack waits for this node to catch up.
        l.acked(Instant::now(), Duration::ZERO, 9);
        assert!(l.lease_valid(t, 7));
        // An old base waiting for its index does not renew an expired lease by itself.
        let l2 = Liveness::default();
        if let Some(old) = Instant::now().checked_sub(Duration::from_millis(600)) {
            l2.acked(old, Duration::ZERO, 1);
            l2.acked(Instant::now(), Duration::ZERO, 5);
            assert!(!l2.lease_valid(t, 4));
            assert!(l2.lease_valid(t, 5));
        }
    }

    #[test]
    fn follower_heartbeat_is_not_acked_without_quorum() {
        let l = Liveness::default();
        assert_eq!(l.heard_from(2), Err(NoAck::NotLeader));
        l.set_leading(Some(3));
        assert_eq!(l.heard_from(2), Err(NoAck::NotLeader));
        l.quorum_confirmed(Instant::now());
        assert!(l.heard_from(2).is_ok());
        // A new term resets the view and the quorum confirmation.
        l.set_leading(Some(4));
        assert_eq!(l.heard_from(2), Err(NoAck::NotLeader));
    }

    #[test]
    fn a_node_being_released_is_not_acked_until_released() {
        let l = Liveness::default();
        l.set_leading(Some(1));
        l.quorum_confirmed(Instant::now());
        // Silent since the term began: with a zero timeout, due at once, and only once.
        assert_eq!(l.take_silent([2, 3], Duration::ZERO).len(), 2);
        assert!(l.take_silent([2, 3], Duration::ZERO).is_empty());
        assert_eq!(l.heard_from(2), Err(NoAck::Releasing));
        l.released(2);
        assert!(l.heard_from(2).is_ok());
        assert_eq!(l.heard_from(3), Err(NoAck::Releasing));
        // Just heard from: not silent.
        l.released(3);
        assert!(l.heard_from(3).is_ok());
        assert!(l.take_silent([3], Duration::from_secs(5)).is_empty());
    }
}
