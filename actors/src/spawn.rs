//! Worker processes: a child node joined to its parent by an inherited
//! socketpair (`fd://N`), like multiprocessing's Process and Pipe.

use std::process::Child;
#[cfg(feature = "transports")]
use std::process::Command;

use actix::Actor;
#[cfg(feature = "transports")]
use courier_runtime::error::RemoteError;
#[cfg(feature = "transports")]
use courier_runtime::session::Role;
#[cfg(feature = "transports")]
use courier_runtime::transport::{Address, Link};

use crate::node::Node;
use crate::remote::RemoteAddr;

/// The environment variable telling a worker which descriptor joins it to
/// its parent (`fd://N`).
pub const WORKER_ENV: &str = "COURIER_PARENT";

/// A spawned worker process and a reference to its root actor.
pub struct Worker<A: Actor> {
    /// The child process (kill it, wait for it).
    pub child: Child,
    /// The actor the worker registered under the name asked for.
    pub root: RemoteAddr<A>,
}

impl Node {
    /// Starts `cmd` as a worker node joined to this one over a socketpair,
    /// and returns a reference to the actor it registers as `name`. The
    /// child finds its end with [`worker_link_from_env`]. When the child
    /// dies, the reference turns dead like any other peer's.
    #[cfg(feature = "transports")]
    pub async fn spawn_worker<A: Actor>(
        &self,
        mut cmd: Command,
        name: &str,
    ) -> Result<Worker<A>, RemoteError> {
        let cfg = courier_transports::StreamConfig::default();
        let (link, addr) =
            courier_transports::fd::socketpair_for_child(&mut cmd, &cfg).map_err(|e| {
                RemoteError::Unreachable {
                    address: "worker socketpair".into(),
                    reason: e.to_string(),
                }
            })?;
        cmd.env(WORKER_ENV, addr.to_string());
        let child = cmd.spawn().map_err(|e| RemoteError::Unreachable {
            address: format!("{cmd:?}"),
            reason: format!("could not start the worker: {e}"),
        })?;
        // The child's end was moved into `cmd`; drop it so only the child
        // holds it, and the parent sees EOF when the child dies.
        drop(cmd);
        let mut child = child;
        let peer = match self.add_link(link, Role::Acceptor, "fd").await {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        match self.lookup_on::<A>(peer.node, name).await {
            Ok(root) => Ok(Worker { child, root }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

/// In a worker: the link to the parent named by [`WORKER_ENV`], to pass to
/// [`crate::NodeBuilder::link`] with [`Role::Initiator`].
#[cfg(feature = "transports")]
pub async fn worker_link_from_env() -> Result<Box<dyn Link>, RemoteError> {
    let bad = |reason: String| RemoteError::Unreachable {
        address: WORKER_ENV.into(),
        reason,
    };
    let v = std::env::var(WORKER_ENV).map_err(|_| {
        bad(format!(
            "{WORKER_ENV} is not set: this process was not started as a worker"
        ))
    })?;
    let addr: Address = v.parse().map_err(|e| bad(format!("{e}")))?;
    if !matches!(addr, Address::Fd { fd: Some(_) }) {
        return Err(bad(format!("{WORKER_ENV} must be fd://N, not {v}")));
    }
    use courier_runtime::transport::Transport as _;
    courier_transports::AnyTransport::new()
        .connect(&addr)
        .await
        .map_err(|e| bad(e.to_string()))
}
