//! The node-to-node listener: one task per authenticated connection, each request answered in
//! order. Raft messages go to openraft; the rest are leader-only calls (see [`crate::network::Rpc`]).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::network::{Reply, Rpc};
use crate::node::ClusterNode;
use crate::rpc::Session;

pub(crate) async fn serve(node: ClusterNode, listener: TcpListener) {
    // Dropping the set (when this task is aborted) aborts every connection task.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_conn(node.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(node: ClusterNode, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    let secret = node.secret().to_vec();
    let secret = secret.as_slice();
    let mut session = match Session::accept(stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };
    loop {
        let body = match session.read_request(secret).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "refusing peer");
                return;
            }
        };
        let reply = match serde_json::from_slice::<Rpc>(&body) {
            Ok(rpc) => dispatch(&node, rpc).await,
            Err(e) => Reply::Error(format!("undecodable request: {e}")),
        };
        let out = match serde_json::to_vec(&reply) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "encoding reply");
                return;
            }
        };
        if let Err(e) = session.write_reply(secret, &out).await {
            tracing::debug!(%peer, error = %e, "writing reply");
            return;
        }
    }
}

/// Serve any request arriving on the listener.
async fn dispatch(node: &ClusterNode, rpc: Rpc) -> Reply {
    let raft = node.raft();
    match rpc {
        Rpc::Append(r) => Reply::Append(raft.append_entries(r).await),
        Rpc::Vote(r) => Reply::Vote(raft.vote(r).await),
        Rpc::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
        Rpc::Ping => Reply::Ack,
        Rpc::Query(body) => match node.answer_query(body).await {
            Ok(answer) => Reply::Query(answer),
            Err(e) => Reply::Error(e),
        },
        other => node.handle_leader(&other).await,
    }
}
