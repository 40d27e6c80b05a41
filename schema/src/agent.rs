//! Messages of the agent channel inside a sandbox process.
//!
//! - The virtio-console shell sends the agent client [`GuestBytes`] and nothing else; the
//!   agent client sends the console shell [`ToConsole`] and nothing else. Both directions
//!   are credit-bounded ([`crate::limits::CREDIT_WINDOW`], [`crate::limits::TO_GUEST_WINDOW`]).
//! - A `Sandbox` handle sends the agent client [`AgentRequest`]s (exec traffic) and nothing
//!   else; lifecycle goes to the supervisor. Every request that expects an answer carries its
//!   reply port, and a request the agent cannot serve is answered with why.
//! - Streamed output is credited by message ([`AgentRequest::Consumed`]): the agent client
//!   counts what each stream's consumer has not read and withholds console credit while one
//!   lags past [`crate::limits::STREAM_WINDOW`]. No counter is shared between components.

use msb_protocol::WinSize;
use ractor::concurrency::MpscUnboundedSender;
use ractor::RpcReplyPort;

use crate::exec::{ExecError, ExecEvent, ExecOutput, ExecSpec};

/// Guest-to-host bytes of the agent channel, copied out of guest memory, and how many
/// host-to-guest bytes the guest has taken since the last report (the agent client's send
/// credit).
#[derive(Debug)]
pub struct GuestBytes {
    pub data: Vec<u8>,
    pub drained: usize,
}

/// What the agent client may send the console shell.
#[derive(Debug)]
pub enum ToConsole {
    /// Host-to-guest bytes (whole frames).
    Bytes(Vec<u8>),
    /// The agent client consumed this many guest bytes.
    Credit(usize),
}

/// An exec id, as the guest protocol numbers requests.
pub type ExecId = u64;

/// What a `Sandbox` handle may ask of the agent client.
#[derive(Debug)]
pub enum AgentRequest {
    /// Answers with the agent's name once its handshake is done.
    WaitReady(RpcReplyPort<Result<String, ExecError>>),
    /// Runs a command and collects its output (bounded).
    Exec { spec: ExecSpec, reply: RpcReplyPort<Result<ExecOutput, ExecError>> },
    /// Starts a command whose events go to `events` as they arrive; answers with its id.
    ExecStream {
        spec: ExecSpec,
        events: MpscUnboundedSender<ExecEvent>,
        reply: RpcReplyPort<Result<ExecId, ExecError>>,
    },
    /// Stdin for a streaming exec; empty closes it.
    Stdin { id: ExecId, data: Vec<u8>, reply: RpcReplyPort<Result<(), ExecError>> },
    /// A signal (1..=64) for a running exec's process group.
    Signal { id: ExecId, signal: i32, reply: RpcReplyPort<Result<(), ExecError>> },
    /// A new terminal size for a PTY exec.
    Resize { id: ExecId, size: WinSize, reply: RpcReplyPort<Result<(), ExecError>> },
    /// The consumer of stream `id` has read `bytes` more output bytes.
    Consumed { id: ExecId, bytes: usize },
}

impl AgentRequest {
    /// Answers the request with `err` (for a request the agent can no longer serve).
    pub fn refuse(self, err: ExecError) {
        match self {
            AgentRequest::WaitReady(reply) => drop(reply.send(Err(err))),
            AgentRequest::Exec { reply, .. } => drop(reply.send(Err(err))),
            AgentRequest::ExecStream { reply, .. } => drop(reply.send(Err(err))),
            AgentRequest::Stdin { reply, .. }
            | AgentRequest::Signal { reply, .. }
            | AgentRequest::Resize { reply, .. } => drop(reply.send(Err(err))),
            AgentRequest::Consumed { .. } => {}
        }
    }
}
