//! msb's sandbox actor tree and its in-process Rust API: the composition root of a sandbox
//! process (named sandboxes, driven from other processes, are `msb-control-plane`'s).
//!
//! ```no_run
//! # async fn demo() -> msb_actors::Result<()> {
//! let sb = msb_actors::Sandbox::builder().memory_mib(256).cpus(1).create().await?;
//! let out = sb.exec("uname", ["-a"]).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! sb.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The tree (one per sandbox): a [`supervisor::SandboxSupervisor`] owning the VM, with linked
//! children `VcpuActor` (one per vCPU runner thread), one device shell per row of the device
//! table ([`devices`]) and the `AgentClient` (the guest protocol). Components only hold the
//! narrowest refs they need, typed by `msb_schema`: the console shell can send the agent
//! client [`GuestBytes`](msb_schema::agent::GuestBytes) and nothing else, the agent client
//! can send the console shell [`ToConsole`](msb_schema::agent::ToConsole) and nothing else,
//! and a [`Sandbox`] handle sends the agent client
//! [`AgentRequest`](msb_schema::agent::AgentRequest)s (exec traffic) and the supervisor
//! lifecycle requests.
//!
//! Supervision fails closed: if a child dies (a guest broke a device or protocol contract),
//! the supervisor stops the VM and reports why; nothing is restarted against a half-changed
//! guest.

#![forbid(unsafe_code)]

mod agent;
pub mod devices;
mod error;
pub mod sandbox;
pub mod supervisor;
#[cfg(test)]
mod test_util;
pub mod vcpu;

/// Log files the sandbox process writes (re-exported so the process needs no device crate).
pub mod logs {
    pub use msb_devices::capped_log::CappedLog;
}

pub use agent::{AgentCore, AgentEvent};
pub use error::{Error, Result};
pub use msb_schema::{
    ExecError, ExecEvent, ExecOutput, ExecSpec, ExitStatus, Rlimit, SpawnErrorKind, StopReason, WinSize,
};
pub use sandbox::{BootTimes, ExecControl, ExecHandle, Network, Sandbox, SandboxBuilder};

/// The network gateway's policy vocabulary, for callers that build a [`Network`].
pub mod net {
    pub use msb_net_gateway::actor::{host_resolver, AUDIT_CAP};
    pub use msb_net_gateway::dialer::{serve as serve_dialer, Config as DialerConfig, Dialer};
    pub use msb_net_gateway::limit::{parse_rate, LimitError, Limits};
    pub use msb_net_gateway::policy::{Action, Policy, PolicyError, Rule};
    pub use msb_net_gateway::tls::host_root_files;
    pub use msb_schema::net::Grants;
    pub use msb_schema::net::{Port, PortProto};
}
