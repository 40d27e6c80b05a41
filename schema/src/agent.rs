//! Messages of the agent channel inside a sandbox process.
//!
//! - The virtio-console shell sends the agent client [`GuestBytes`] and nothing else; the
//!   agent client sends the console shell [`ToConsole`] and nothing else. Both directions
//!   are credit-bounded ([`crate::limits::CREDIT_WINDOW`], [`crate::limits::TO_GUEST_WINDOW`]).
//! - A `Sandbox` handle sends the agent client [`AgentRequest`]s (exec traffic) and nothing
//!   else; lifecycle goes to the supervisor. Every request that expects an answer carries its
//!   reply port, and a request the agent cannot serve is answered with why.
//! - Streamed output is credited by message: one [`AgentRequest::Consumed`] per output event
//!   read, and [`AgentRequest::Release`] when the consumer lets go. The agent client passes
//!   the credit on to the guest per exec (the protocol's output window), so a consumer that
//!   lags stalls only its own exec. No counter is shared between components.
//! - Stdin is answered only once it has gone to the guest, against credit the guest
//!   returned, so a writer is paced by the command that reads it.

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
    /// Stdin for a streaming exec (at most [`crate::limits::STDIN_CHUNK`] bytes); empty closes
    /// it. Answered once the guest has room for it and it has gone out.
    Stdin { id: ExecId, data: Vec<u8>, reply: RpcReplyPort<Result<(), ExecError>> },
    /// A signal (1..=64) for a running exec's process group.
    Signal { id: ExecId, signal: i32, reply: RpcReplyPort<Result<(), ExecError>> },
    /// A new terminal size for a PTY exec.
    Resize { id: ExecId, size: WinSize, reply: RpcReplyPort<Result<(), ExecError>> },
    /// The consumer of stream `id` has read one output event of `bytes` bytes.
    Consumed { id: ExecId, bytes: usize },
    /// The consumer of stream `id` is gone: the command runs on, its output is dropped.
    Release { id: ExecId },
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
            AgentRequest::Consumed { .. } | AgentRequest::Release { .. } => {}
        }
    }
}
