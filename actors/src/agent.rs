//! The host end of the guest protocol.
//!
//! [`AgentCore`] is the pure state machine: it turns guest bytes into events and requests
//! into frames. [`AgentClient`] is its actor shell: it owns the reply ports of pending
//! requests, talks to the virtio-console shell through the narrow [`ToConsole`] ref, and
//! takes exec traffic from `Sandbox` handles as [`AgentRequest`]s (a narrowed ref).
//!
//! Invariants: everything from the guest is hostile. A frame that is oversized, truncated,
//! undecodable, out of order (anything before `Ready`), or that names a request the host
//! never made closes the channel for good, and every pending request fails with the reason.
//! At most [`MAX_PENDING`] requests are in flight, and a buffered exec keeps at most
//! [`MAX_BUFFERED_OUTPUT`] bytes of output. Each stream's unread output is counted here, from
//! [`AgentRequest::Consumed`] messages; while one lags past [`STREAM_WINDOW`] console credit
//! is withheld.

use std::collections::HashMap;

use msb_protocol::{
    decode, encode, negotiate, ExecRequest, FrameDecoder, GuestMsg, HostMsg, RequestId, SpawnErrorKind, Stream,
    MAX_OUTPUT_CHUNK, PROTOCOL_VERSION,
};
use msb_schema::agent::{AgentRequest, GuestBytes, ToConsole};
use msb_schema::limits::{MAX_BUFFERED_OUTPUT, MAX_GUEST_LOGS, MAX_PENDING, MAX_STDIN, STREAM_WINDOW, TO_GUEST_WINDOW};
use msb_schema::{ExecError, ExecEvent, ExecOutput, ExecSpec, StopReason};
use ractor::concurrency::MpscUnboundedSender;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};

type Result<T> = std::result::Result<T, ExecError>;

#[derive(Debug)]
struct PendingExec {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    overflowed: bool,
    timed_out: bool,
    /// Output goes out as events instead of being collected.
    streaming: bool,
}

/// What the guest's bytes amounted to.
#[derive(Debug, PartialEq)]
pub enum AgentEvent {
    /// Handshake done; `reply` must be sent to the guest.
    Ready {
        version: u16,
        agent: String,
        reply: Vec<u8>,
    },
    ExecDone {
        id: RequestId,
        result: std::result::Result<ExecOutput, ExecFailure>,
    },
    /// Output of a streaming exec.
    Output {
        id: RequestId,
        stream: Stream,
        data: Vec<u8>,
    },
    ShutdownAck {
        id: RequestId,
    },
}

/// Why an exec produced no output record.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecFailure {
    Spawn { kind: SpawnErrorKind, message: String },
    TooLarge,
    TimedOut,
}

#[derive(Debug, Default)]
pub struct AgentCore {
    decoder: FrameDecoder,
    version: Option<u16>,
    closed: Option<String>,
    next_id: RequestId,
    execs: HashMap<RequestId, PendingExec>,
    shutdowns: Vec<RequestId>,
    guest_logs: u64,
}

impl AgentCore {
    pub fn new() -> Self {
        Self { next_id: 1, ..Default::default() }
    }

    pub fn is_ready(&self) -> bool {
        self.version.is_some() && self.closed.is_none()
    }

    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    fn close(&mut self, why: String) -> String {
        self.closed.get_or_insert(why).clone()
    }

    fn pending(&self) -> usize {
        self.execs.len() + self.shutdowns.len()
    }

    fn next_id(&mut self) -> Result<RequestId> {
        if let Some(why) = &self.closed {
            return Err(ExecError::ChannelClosed(why.clone()));
        }
        if self.version.is_none() {
            return Err(ExecError::NotReady);
        }
        if self.pending() >= MAX_PENDING {
            return Err(ExecError::TooManyRequests { limit: MAX_PENDING as u64 });
        }
        let id = self.next_id;
        self.next_id += 1;
        Ok(id)
    }

    /// Starts an exec; returns its id and the frames to send (the request, then its stdin in
    /// chunks and an end-of-input chunk).
    pub fn exec(&mut self, spec: ExecSpec) -> Result<(RequestId, Vec<Vec<u8>>)> {
        self.exec_with(spec, false)
    }

    /// Starts an exec whose output is streamed as [`AgentEvent::Output`] and whose stdin stays
    /// open for [`AgentCore::stdin`] (`spec.stdin` is sent first, without closing it).
    pub fn exec_streaming(&mut self, spec: ExecSpec) -> Result<(RequestId, Vec<Vec<u8>>)> {
        let spec = ExecSpec { stdin: Some(spec.stdin.clone().unwrap_or_default()), ..spec };
        let (id, mut frames) = self.exec_with(spec, true)?;
        frames.pop(); // keep stdin open
        Ok((id, frames))
    }

    /// More stdin for a running streaming exec; an empty `data` closes it.
    pub fn stdin(&mut self, id: RequestId, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        if !self.execs.get(&id).is_some_and(|p| p.streaming) {
            return Err(ExecError::StdinClosed);
        }
        if data.is_empty() {
            return Ok(vec![encode(&HostMsg::Stdin { id, data: Vec::new() }).expect("small message encodes")]);
        }
        Ok(data
            .chunks(MAX_OUTPUT_CHUNK)
            .map(|c| encode(&HostMsg::Stdin { id, data: c.to_vec() }).expect("bounded chunk encodes"))
            .collect())
    }

    /// A signal for a running exec.
    pub fn signal(&mut self, id: RequestId, signal: i32) -> Result<Vec<u8>> {
        if !(1..=64).contains(&signal) {
            return Err(ExecError::Invalid(format!("signal {signal} is outside 1..=64")));
        }
        if !self.execs.contains_key(&id) {
            return Err(ExecError::NotRunning { id });
        }
        Ok(encode(&HostMsg::Signal { id, signal }).expect("small message encodes"))
    }

    /// A new window size for a running exec's terminal.
    pub fn resize(&mut self, id: RequestId, size: msb_protocol::WinSize) -> Result<Vec<u8>> {
        if size.rows == 0 || size.cols == 0 {
            return Err(ExecError::Invalid("a terminal needs at least one row and one column".into()));
        }
        if !self.execs.contains_key(&id) {
            return Err(ExecError::NotRunning { id });
        }
        Ok(encode(&HostMsg::Resize { id, size }).expect("small message encodes"))
    }

    fn exec_with(&mut self, spec: ExecSpec, streaming: bool) -> Result<(RequestId, Vec<Vec<u8>>)> {
        if spec.stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN) {
            return Err(ExecError::Invalid(format!("stdin larger than {MAX_STDIN} bytes for a buffered exec")));
        }
        let id = self.next_id()?;
        let timeout_ms = spec.timeout_ms();
        let req = ExecRequest {
            id,
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            timeout_ms,
            stdin: spec.stdin.is_some(),
            tty: spec.tty,
            rlimits: spec.rlimits,
        };
        req.validate().map_err(ExecError::Invalid)?;
        let mut frames = vec![encode(&HostMsg::Exec(req)).map_err(|e| ExecError::Invalid(e.to_string()))?];
        if let Some(input) = spec.stdin {
            for chunk in input.chunks(MAX_OUTPUT_CHUNK) {
                frames.push(encode(&HostMsg::Stdin { id, data: chunk.to_vec() }).expect("bounded chunk encodes"));
            }
            frames.push(encode(&HostMsg::Stdin { id, data: Vec::new() }).expect("small message encodes"));
        }
        self.execs.insert(
            id,
            PendingExec { stdout: Vec::new(), stderr: Vec::new(), overflowed: false, timed_out: false, streaming },
        );
        Ok((id, frames))
    }

    /// Starts an orderly shutdown; returns its id and the frame to send.
    pub fn shutdown(&mut self) -> Result<(RequestId, Vec<u8>)> {
        let id = self.next_id()?;
        self.shutdowns.push(id);
        Ok((id, encode(&HostMsg::Shutdown { id }).expect("small message encodes")))
    }

    /// Consumes guest bytes. An `Err` means the channel is now closed; the string says why.
    pub fn on_bytes(&mut self, data: &[u8]) -> std::result::Result<Vec<AgentEvent>, String> {
        if let Some(why) = &self.closed {
            return Err(why.clone());
        }
        let mut frames = Vec::new();
        if let Err(e) = self.decoder.feed(data, &mut |f| frames.push(f)) {
            return Err(self.close(format!("bad frame from guest: {e}")));
        }
        let mut events = Vec::new();
        for f in frames {
            let msg: GuestMsg = match decode(&f) {
                Ok(m) => m,
                Err(e) => return Err(self.close(format!("bad message from guest: {e}"))),
            };
            match self.on_msg(msg) {
                Ok(Some(ev)) => events.push(ev),
                Ok(None) => {}
                Err(why) => return Err(self.close(why)),
            }
        }
        Ok(events)
    }

    fn on_msg(&mut self, msg: GuestMsg) -> std::result::Result<Option<AgentEvent>, String> {
        if self.version.is_none() {
            let GuestMsg::Ready { min_version, max_version, agent } = msg else {
                return Err("guest sent a request reply before Ready".into());
            };
            let version = negotiate(min_version, max_version).ok_or_else(|| {
                format!(
                    "agentd ({agent}) speaks protocol {min_version}..={max_version}, this host speaks {PROTOCOL_VERSION}; \
                     rebuild the initramfs with this msb's agentd"
                )
            })?;
            self.version = Some(version);
            let reply = encode(&HostMsg::Hello { version }).expect("small message encodes");
            return Ok(Some(AgentEvent::Ready { version, agent, reply }));
        }
        let unknown = |id| format!("guest answered request {id}, which is not pending");
        match msg {
            GuestMsg::Ready { .. } => Err("guest sent Ready twice".into()),
            GuestMsg::Started { id, .. } => self.execs.contains_key(&id).then_some(None).ok_or_else(|| unknown(id)),
            GuestMsg::Output { id, stream, data } => {
                if data.len() > MAX_OUTPUT_CHUNK {
                    return Err(format!("output chunk of {} bytes exceeds {MAX_OUTPUT_CHUNK}", data.len()));
                }
                let p = self.execs.get_mut(&id).ok_or_else(|| unknown(id))?;
                if p.streaming {
                    return Ok(Some(AgentEvent::Output { id, stream, data }));
                }
                if p.stdout.len() + p.stderr.len() + data.len() > MAX_BUFFERED_OUTPUT {
                    p.overflowed = true;
                    p.stdout = Vec::new();
                    p.stderr = Vec::new();
                }
                if !p.overflowed {
                    match stream {
                        Stream::Stdout => p.stdout.extend_from_slice(&data),
                        Stream::Stderr => p.stderr.extend_from_slice(&data),
                    }
                }
                Ok(None)
            }
            GuestMsg::TimedOut { id } => {
                self.execs.get_mut(&id).ok_or_else(|| unknown(id))?.timed_out = true;
                Ok(None)
            }
            GuestMsg::Exited { id, status } => {
                let p = self.execs.remove(&id).ok_or_else(|| unknown(id))?;
                let result = if p.timed_out {
                    Err(ExecFailure::TimedOut)
                } else if p.overflowed {
                    Err(ExecFailure::TooLarge)
                } else {
                    Ok(ExecOutput { status, stdout: p.stdout, stderr: p.stderr })
                };
                Ok(Some(AgentEvent::ExecDone { id, result }))
            }
            GuestMsg::SpawnFailed { id, kind, message } => {
                self.execs.remove(&id).ok_or_else(|| unknown(id))?;
                Ok(Some(AgentEvent::ExecDone { id, result: Err(ExecFailure::Spawn { kind, message }) }))
            }
            GuestMsg::ShutdownAck { id } => {
                let at = self.shutdowns.iter().position(|s| *s == id).ok_or_else(|| unknown(id))?;
                self.shutdowns.remove(at);
                Ok(Some(AgentEvent::ShutdownAck { id }))
            }
            GuestMsg::Error { message } => {
                // Guest-triggerable: at most MAX_GUEST_LOGS lines per sandbox, each cut short.
                self.guest_logs += 1;
                if self.guest_logs <= MAX_GUEST_LOGS {
                    tracing::warn!("agentd reported: {}", message.chars().take(200).collect::<String>());
                } else if self.guest_logs == MAX_GUEST_LOGS + 1 {
                    tracing::warn!("agentd keeps reporting errors; further reports are not logged");
                }
                Ok(None)
            }
        }
    }
}

/// Messages of the agent client actor.
pub enum AgentMsg {
    /// Bytes from the virtio-console shell.
    FromGuest(GuestBytes),
    /// The console shell, once it exists.
    Attach(DerivedActorRef<ToConsole>),
    /// Exec traffic from a `Sandbox` handle.
    Request(AgentRequest),
    /// From the supervisor: an orderly shutdown of the guest.
    Shutdown(RpcReplyPort<Result<()>>),
    /// From the supervisor: the VM is gone; fail everything pending with this reason and
    /// console tail.
    VmStopped(StopReason, String),
}

impl From<GuestBytes> for AgentMsg {
    fn from(b: GuestBytes) -> Self {
        AgentMsg::FromGuest(b)
    }
}

impl TryFrom<AgentMsg> for GuestBytes {
    type Error = ();
    fn try_from(m: AgentMsg) -> std::result::Result<Self, ()> {
        match m {
            AgentMsg::FromGuest(b) => Ok(b),
            _ => Err(()),
        }
    }
}

impl From<AgentRequest> for AgentMsg {
    fn from(r: AgentRequest) -> Self {
        AgentMsg::Request(r)
    }
}

impl TryFrom<AgentMsg> for AgentRequest {
    type Error = ();
    fn try_from(m: AgentMsg) -> std::result::Result<Self, ()> {
        match m {
            AgentMsg::Request(r) => Ok(r),
            _ => Err(()),
        }
    }
}

/// A streaming exec's consumer, and how many output bytes it has not read.
#[derive(Debug)]
struct StreamSink {
    events: MpscUnboundedSender<ExecEvent>,
    unconsumed: usize,
}

pub struct AgentClient;

#[derive(Default)]
pub struct AgentState {
    core: AgentCore,
    console: Option<DerivedActorRef<ToConsole>>,
    agent_name: Option<String>,
    ready_waiters: Vec<RpcReplyPort<Result<String>>>,
    exec_replies: HashMap<RequestId, RpcReplyPort<Result<ExecOutput>>>,
    shutdown_replies: HashMap<RequestId, RpcReplyPort<Result<()>>>,
    stopped: Option<(StopReason, String)>,
    /// Frames waiting for send credit, and bytes sent but not yet taken by the guest.
    outbox: std::collections::VecDeque<Vec<u8>>,
    to_guest_in_flight: usize,
    exec_timeouts: HashMap<RequestId, std::time::Duration>,
    streams: HashMap<RequestId, StreamSink>,
    /// Guest bytes consumed but not yet credited back, while a stream consumer lags.
    withheld: usize,
}

impl AgentState {
    fn send(&mut self, frame: Vec<u8>) {
        self.outbox.push_back(frame);
        self.flush();
    }

    /// Hands queued frames to the console while the guest keeps up (whole frames only).
    fn flush(&mut self) {
        let Some(c) = &self.console else { return };
        while let Some(f) = self.outbox.front() {
            if self.to_guest_in_flight > 0 && self.to_guest_in_flight + f.len() > TO_GUEST_WINDOW {
                break;
            }
            let f = self.outbox.pop_front().expect("front exists");
            self.to_guest_in_flight += f.len();
            let _ = c.send_message(ToConsole::Bytes(f));
        }
    }

    fn failure(&self) -> ExecError {
        failure_of(&self.stopped, self.core.closed())
    }

    /// Starts an exec (buffered or streaming): sends its frames and remembers its timeout.
    fn start_exec(&mut self, spec: ExecSpec, streaming: bool) -> Result<RequestId> {
        if self.stopped.is_some() {
            return Err(self.failure());
        }
        let timeout = spec.timeout;
        let (id, frames) = if streaming { self.core.exec_streaming(spec)? } else { self.core.exec(spec)? };
        if let Some(t) = timeout {
            self.exec_timeouts.insert(id, t);
        }
        for f in frames {
            self.send(f);
        }
        Ok(id)
    }

    /// Credits the console with consumed guest bytes unless a stream consumer lags.
    fn release_credit(&mut self) {
        let lagging = self.streams.values().any(|s| s.unconsumed > STREAM_WINDOW);
        if lagging || self.withheld == 0 {
            return;
        }
        if let Some(c) = &self.console {
            let _ = c.send_message(ToConsole::Credit(std::mem::take(&mut self.withheld)));
        }
    }

    /// Answers every pending request with why the agent can no longer serve it.
    fn fail_all_with(&mut self) {
        let (stopped, closed) = (self.stopped.clone(), self.core.closed().map(String::from));
        let err = || failure_of(&stopped, closed.as_deref());
        for w in self.ready_waiters.drain(..) {
            let _ = w.send(Err(err()));
        }
        for (_, r) in self.exec_replies.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.shutdown_replies.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, sink) in self.streams.drain() {
            let _ = sink.events.send(ExecEvent::Failed(err()));
        }
    }
}

/// Why requests cannot be served: the VM stopped, or the channel closed.
fn failure_of(stopped: &Option<(StopReason, String)>, closed: Option<&str>) -> ExecError {
    match (stopped, closed) {
        (Some((reason, tail)), _) => ExecError::VmStopped { reason: reason.clone(), console_tail: tail.clone() },
        (None, Some(why)) => ExecError::ChannelClosed(why.to_string()),
        (None, None) => ExecError::Gone,
    }
}

impl Actor for AgentClient {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<AgentMsg>, _: ()) -> std::result::Result<AgentState, ActorProcessingErr> {
        Ok(AgentState { core: AgentCore::new(), ..Default::default() })
    }

    async fn post_stop(
        &self,
        _: ActorRef<AgentMsg>,
        st: &mut AgentState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        st.fail_all_with();
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<AgentMsg>,
        msg: AgentMsg,
        st: &mut AgentState,
    ) -> std::result::Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Attach(c) => {
                st.console = Some(c);
                st.flush();
            }
            AgentMsg::FromGuest(GuestBytes { data, drained }) => {
                st.to_guest_in_flight = st.to_guest_in_flight.saturating_sub(drained);
                st.flush();
                let n = data.len();
                let events = st.core.on_bytes(&data);
                st.withheld += n;
                match events {
                    Ok(events) => {
                        for ev in events {
                            handle_event(st, ev);
                        }
                        st.release_credit();
                    }
                    Err(why) => {
                        // Dying takes the VM down: a guest that breaks the protocol is not
                        // served. Pending requests are dropped; callers learn the stop reason
                        // from the supervisor.
                        return Err(format!("agent channel: {why}").into());
                    }
                }
            }
            AgentMsg::Request(req) => handle_request(st, req),
            AgentMsg::Shutdown(reply) => match st.core.shutdown() {
                Ok((id, frame)) => {
                    st.shutdown_replies.insert(id, reply);
                    st.send(frame);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            AgentMsg::VmStopped(reason, tail) => {
                // Fail everything pending with the reason, then stop: the supervisor sends
                // this instead of a stop signal so that the reason is not overtaken.
                tracing::debug!(%reason, execs = st.exec_replies.len(), "agent client: VM stopped");
                st.stopped = Some((reason, tail));
                st.fail_all_with();
                me.stop(None);
            }
        }
        Ok(())
    }
}

/// Serves one request of a `Sandbox` handle.
fn handle_request(st: &mut AgentState, req: AgentRequest) {
    match req {
        AgentRequest::WaitReady(reply) => match (&st.agent_name, st.core.is_ready()) {
            (Some(name), true) => {
                let _ = reply.send(Ok(name.clone()));
            }
            _ if st.stopped.is_some() || st.core.closed().is_some() => {
                let _ = reply.send(Err(st.failure()));
            }
            _ => st.ready_waiters.push(reply),
        },
        AgentRequest::Exec { spec, reply } => match st.start_exec(spec, false) {
            Ok(id) => {
                st.exec_replies.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        AgentRequest::ExecStream { spec, events, reply } => {
            let started = st.start_exec(spec, true);
            if let Ok(id) = started {
                st.streams.insert(id, StreamSink { events, unconsumed: 0 });
            }
            let _ = reply.send(started);
        }
        AgentRequest::Stdin { id, data, reply } => {
            let r = st.core.stdin(id, &data).map(|frames| {
                for f in frames {
                    st.send(f);
                }
            });
            let _ = reply.send(r);
        }
        AgentRequest::Signal { id, signal, reply } => {
            let r = st.core.signal(id, signal).map(|f| st.send(f));
            let _ = reply.send(r);
        }
        AgentRequest::Resize { id, size, reply } => {
            let r = st.core.resize(id, size).map(|f| st.send(f));
            let _ = reply.send(r);
        }
        AgentRequest::Consumed { id, bytes } => {
            if let Some(s) = st.streams.get_mut(&id) {
                s.unconsumed = s.unconsumed.saturating_sub(bytes);
            }
            st.release_credit();
        }
    }
}

fn handle_event(st: &mut AgentState, ev: AgentEvent) {
    match ev {
        AgentEvent::Ready { version, agent, reply } => {
            tracing::info!(version, %agent, "guest agent ready");
            st.send(reply);
            st.agent_name = Some(agent.clone());
            for w in st.ready_waiters.drain(..) {
                let _ = w.send(Ok(agent.clone()));
            }
        }
        AgentEvent::ExecDone { id, result } => {
            let timeout = st.exec_timeouts.remove(&id).unwrap_or_default();
            let result = result.map_err(|f| match f {
                ExecFailure::Spawn { kind, message } => ExecError::SpawnFailed { kind, message },
                ExecFailure::TooLarge => ExecError::OutputTooLarge { limit: MAX_BUFFERED_OUTPUT as u64 },
                ExecFailure::TimedOut => ExecError::TimedOut { after: timeout },
            });
            if let Some(r) = st.exec_replies.remove(&id) {
                let _ = r.send(result);
            } else if let Some(sink) = st.streams.remove(&id) {
                let _ = sink.events.send(match result {
                    Ok(out) => ExecEvent::Exited(out.status),
                    Err(e) => ExecEvent::Failed(e),
                });
                // A finished stream no longer holds back credit.
                st.release_credit();
            }
        }
        AgentEvent::Output { id, stream, data } => {
            let Some(sink) = st.streams.get_mut(&id) else { return };
            let n = data.len();
            let ev = match stream {
                Stream::Stdout => ExecEvent::Stdout(data),
                Stream::Stderr => ExecEvent::Stderr(data),
            };
            sink.unconsumed += n;
            if sink.events.send(ev).is_err() {
                // Nobody reads this stream any more: stop accounting for it.
                st.streams.remove(&id);
            }
        }
        AgentEvent::ShutdownAck { id } => {
            if let Some(r) = st.shutdown_replies.remove(&id) {
                let _ = r.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msb_protocol::ExitStatus;

    fn frame(m: &GuestMsg) -> Vec<u8> {
        encode(m).unwrap()
    }

    fn ready_core() -> AgentCore {
        let mut c = AgentCore::new();
        let ev = c
            .on_bytes(&frame(&GuestMsg::Ready {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                agent: "t".into(),
            }))
            .unwrap();
        assert!(matches!(ev[0], AgentEvent::Ready { version: PROTOCOL_VERSION, .. }));
        c
    }

    #[test]
    fn exec_round_trip_collects_streams_separately() {
        let mut c = ready_core();
        let (id, _) = c.exec(ExecSpec { argv: vec!["echo".into()], ..Default::default() }).unwrap();
        let mut bytes = frame(&GuestMsg::Started { id, pid: 5 });
        bytes.extend(frame(&GuestMsg::Output { id, stream: Stream::Stdout, data: b"out".to_vec() }));
        bytes.extend(frame(&GuestMsg::Output { id, stream: Stream::Stderr, data: b"err".to_vec() }));
        bytes.extend(frame(&GuestMsg::Exited { id, status: ExitStatus::Code(42) }));
        let ev = c.on_bytes(&bytes).unwrap();
        let AgentEvent::ExecDone { result: Ok(out), .. } = &ev[0] else { panic!("{ev:?}") };
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
        assert_eq!(out.code(), Some(42));
    }

    #[test]
    fn stdin_is_sent_in_bounded_chunks_then_closed() {
        let mut c = ready_core();
        let input = vec![7u8; MAX_OUTPUT_CHUNK * 2 + 5];
        let spec = ExecSpec { argv: vec!["cat".into()], stdin: Some(input.clone()), ..Default::default() };
        let (id, frames) = c.exec(spec).unwrap();
        let msgs: Vec<HostMsg> = frames.iter().map(|f| decode(&f[4..]).unwrap()).collect();
        assert!(matches!(&msgs[0], HostMsg::Exec(r) if r.stdin && r.id == id));
        let mut got = Vec::new();
        for m in &msgs[1..msgs.len() - 1] {
            let HostMsg::Stdin { data, .. } = m else { panic!("{m:?}") };
            assert!(!data.is_empty() && data.len() <= MAX_OUTPUT_CHUNK);
            got.extend_from_slice(data);
        }
        assert_eq!(got, input);
        assert_eq!(msgs.last(), Some(&HostMsg::Stdin { id, data: vec![] }), "end of input");
        let too_big = ExecSpec { argv: vec!["cat".into()], stdin: Some(vec![0; MAX_STDIN + 1]), ..Default::default() };
        assert!(c.exec(too_big).is_err());
    }

    #[test]
    fn timeout_is_reported_as_such() {
        let mut c = ready_core();
        let spec = ExecSpec {
            argv: vec!["sleep".into(), "9".into()],
            timeout: Some(std::time::Duration::from_millis(1500)),
            ..Default::default()
        };
        let (id, frames) = c.exec(spec).unwrap();
        let HostMsg::Exec(r) = decode(&frames[0][4..]).unwrap() else { panic!() };
        assert_eq!(r.timeout_ms, Some(1500));
        let mut bytes = frame(&GuestMsg::TimedOut { id });
        bytes.extend(frame(&GuestMsg::Exited { id, status: ExitStatus::Signal(9) }));
        assert_eq!(c.on_bytes(&bytes).unwrap(), vec![AgentEvent::ExecDone { id, result: Err(ExecFailure::TimedOut) }]);
    }

    #[test]
    fn requests_before_ready_are_refused() {
        let mut c = AgentCore::new();
        assert!(c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }).is_err());
        let e = c.on_bytes(&frame(&GuestMsg::ShutdownAck { id: 1 })).unwrap_err();
        assert!(e.contains("before Ready"), "{e}");
    }

    #[test]
    fn unknown_ids_and_garbage_close_the_channel() {
        let mut c = ready_core();
        let e = c.on_bytes(&frame(&GuestMsg::Exited { id: 99, status: ExitStatus::Code(0) })).unwrap_err();
        assert!(e.contains("99"), "{e}");
        assert!(c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }).is_err(), "closed for good");

        let mut c = ready_core();
        let e = c.on_bytes(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.contains("bad message"), "{e}");

        let mut c = ready_core();
        let e = c.on_bytes(&u32::MAX.to_le_bytes()).unwrap_err();
        assert!(e.contains("exceeds"), "{e}");
    }

    #[test]
    fn incompatible_version_is_explained() {
        let mut c = AgentCore::new();
        let e = c
            .on_bytes(&frame(&GuestMsg::Ready { min_version: 50, max_version: 60, agent: "future".into() }))
            .unwrap_err();
        assert!(e.contains("rebuild the initramfs"), "{e}");
    }

    #[test]
    fn buffered_output_is_bounded() {
        let mut c = ready_core();
        let (id, _) = c.exec(ExecSpec { argv: vec!["yes".into()], ..Default::default() }).unwrap();
        let chunk = frame(&GuestMsg::Output { id, stream: Stream::Stdout, data: vec![b'y'; MAX_OUTPUT_CHUNK] });
        for _ in 0..(MAX_BUFFERED_OUTPUT / MAX_OUTPUT_CHUNK + 2) {
            c.on_bytes(&chunk).unwrap();
        }
        assert!(c.execs[&id].stdout.is_empty(), "overflowed output is dropped, not kept");
        let ev = c.on_bytes(&frame(&GuestMsg::Exited { id, status: ExitStatus::Code(0) })).unwrap();
        assert_eq!(ev, vec![AgentEvent::ExecDone { id, result: Err(ExecFailure::TooLarge) }]);
    }

    #[test]
    fn guest_error_reports_are_counted_and_do_not_close_the_channel() {
        let mut c = ready_core();
        let e = frame(&GuestMsg::Error { message: "x".repeat(10_000) });
        for _ in 0..1000 {
            assert_eq!(c.on_bytes(&e).unwrap(), vec![]);
        }
        assert_eq!(c.guest_logs, 1000);
        assert!(c.is_ready());
    }

    #[test]
    fn requests_for_unknown_execs_and_bad_values_are_typed() {
        let mut c = ready_core();
        assert_eq!(c.signal(7, 9), Err(ExecError::NotRunning { id: 7 }));
        assert!(matches!(c.signal(7, 0), Err(ExecError::Invalid(_))));
        assert_eq!(c.stdin(7, b"x"), Err(ExecError::StdinClosed));
        assert!(matches!(c.resize(7, msb_protocol::WinSize { rows: 0, cols: 1 }), Err(ExecError::Invalid(_))));
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut c = ready_core();
        for _ in 0..MAX_PENDING {
            c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }).unwrap();
        }
        let e = c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }).unwrap_err();
        assert_eq!(e, ExecError::TooManyRequests { limit: MAX_PENDING as u64 });
    }
}

#[cfg(test)]
mod actor_tests {
    use super::*;

    #[tokio::test]
    async fn pending_exec_fails_with_the_stop_reason() {
        let (agent, _h) = Actor::spawn(None, AgentClient, ()).await.unwrap();
        let ready = encode(&GuestMsg::Ready {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent: "t".into(),
        })
        .unwrap();
        agent.cast(AgentMsg::FromGuest(GuestBytes { data: ready, drained: 0 })).unwrap();
        let (tx, rx) = ractor::concurrency::oneshot();
        let requests: DerivedActorRef<AgentRequest> = agent.get_derived();
        requests.send_message(AgentRequest::Exec { spec: ExecSpec::command(["x"]), reply: tx.into() }).unwrap();
        agent.cast(AgentMsg::VmStopped(StopReason::GuestPowerOff, "tail".into())).unwrap();
        match rx.await.unwrap() {
            Err(ExecError::VmStopped { reason: StopReason::GuestPowerOff, console_tail }) => {
                assert_eq!(console_tail, "tail")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod stream_credit_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Stands in for the console shell: sums the credit it is given.
    struct FakeConsole;
    impl Actor for FakeConsole {
        type Msg = ToConsole;
        type State = Arc<AtomicUsize>;
        type Arguments = Arc<AtomicUsize>;
        async fn pre_start(
            &self,
            _: ActorRef<ToConsole>,
            n: Arc<AtomicUsize>,
        ) -> std::result::Result<Self::State, ActorProcessingErr> {
            Ok(n)
        }
        async fn handle(
            &self,
            _: ActorRef<ToConsole>,
            m: ToConsole,
            n: &mut Self::State,
        ) -> std::result::Result<(), ActorProcessingErr> {
            if let ToConsole::Credit(c) = m {
                n.fetch_add(c, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_lagging_stream_withholds_credit_until_its_consumer_reports_progress() {
        let credited = Arc::new(AtomicUsize::new(0));
        let (console, _) = Actor::spawn(None, FakeConsole, credited.clone()).await.unwrap();
        let (agent, _) = Actor::spawn(None, AgentClient, ()).await.unwrap();
        agent.cast(AgentMsg::Attach(console.get_derived())).unwrap();
        let ready = encode(&GuestMsg::Ready {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent: "t".into(),
        })
        .unwrap();
        agent.cast(AgentMsg::FromGuest(GuestBytes { data: ready.clone(), drained: 0 })).unwrap();
        let requests: DerivedActorRef<AgentRequest> = agent.get_derived();
        let (events, mut rx) = ractor::concurrency::mpsc_unbounded();
        let (tx, id_rx) = ractor::concurrency::oneshot();
        requests
            .send_message(AgentRequest::ExecStream { spec: ExecSpec::command(["yes"]), events, reply: tx.into() })
            .unwrap();
        let id = id_rx.await.unwrap().unwrap();

        let chunk =
            encode(&GuestMsg::Output { id, stream: Stream::Stdout, data: vec![b'y'; MAX_OUTPUT_CHUNK] }).unwrap();
        let chunks = STREAM_WINDOW / MAX_OUTPUT_CHUNK + 16;
        for _ in 0..chunks {
            agent.cast(AgentMsg::FromGuest(GuestBytes { data: chunk.clone(), drained: 0 })).unwrap();
        }
        let mut received = 0;
        while received < chunks {
            assert!(matches!(rx.recv().await, Some(ExecEvent::Stdout(_))));
            received += 1;
        }
        // Credit flows while the consumer is within the window, and stops past it.
        let within = ready.len() + (STREAM_WINDOW / MAX_OUTPUT_CHUNK) * chunk.len();
        crate::test_util::eventually("credit for the window arrived", || credited.load(Ordering::SeqCst) == within)
            .await;
        let (tx, rx_ready) = ractor::concurrency::oneshot();
        requests.send_message(AgentRequest::WaitReady(tx.into())).unwrap();
        rx_ready.await.unwrap().unwrap(); // the agent has handled everything before it
        assert_eq!(credited.load(Ordering::SeqCst), within, "no credit while the consumer lags");
        // The consumer reports what it read: the withheld credit is released.
        requests.send_message(AgentRequest::Consumed { id, bytes: chunks * MAX_OUTPUT_CHUNK }).unwrap();
        let all = ready.len() + chunks * chunk.len();
        crate::test_util::eventually("the withheld credit was released", || credited.load(Ordering::SeqCst) == all)
            .await;
    }
}
