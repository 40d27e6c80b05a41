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
//! [`MAX_BUFFERED_OUTPUT`] bytes of output.
//!
//! Flow control is per exec, both ways (the protocol's windows): the guest may owe the host
//! at most [`OUTPUT_WINDOW`] units of one exec's output, and each unit is acknowledged only
//! once it is consumed — at once for a buffered exec, on [`AgentRequest::Consumed`] for a
//! stream, at once again after the stream's consumer let go ([`AgentRequest::Release`]) or
//! its deadline passed. An overdraw or an empty `Output` closes the channel. Stdin goes out
//! only against the credit agentd returned; a write that does not fit waits here (at most
//! [`MAX_PARKED_STDIN`] per exec) and is answered when it has gone out. Console credit is
//! never withheld, so one stalled consumer stalls only its own exec.
//!
//! Deadlines are the host's: when an exec's timeout passes, its caller is answered
//! [`ExecError::TimedOut`] at once and agentd is told to kill everything the exec started.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use msb_protocol::{
    cost, decode, encode, negotiate, ExecRequest, FrameDecoder, GuestMsg, HostMsg, RequestId, SpawnErrorKind, Stream,
    MAX_OUTPUT_CHUNK, OUTPUT_WINDOW, PROTOCOL_VERSION, STDIN_WINDOW,
};
use msb_schema::agent::{AgentRequest, GuestBytes, ToConsole};
use msb_schema::limits::{
    MAX_BUFFERED_OUTPUT, MAX_GUEST_LOGS, MAX_OUTBOX, MAX_PARKED_STDIN, MAX_PENDING, MAX_STDIN, STDIN_CHUNK,
    TO_GUEST_WINDOW,
};
use msb_schema::{ExecError, ExecEvent, ExecOutput, ExecSpec, StopReason};
use ractor::concurrency::MpscUnboundedSender;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};

type Result<T> = std::result::Result<T, ExecError>;

#[derive(Debug, Default)]
struct PendingExec {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    overflowed: bool,
    /// Output goes out as events instead of being collected.
    streaming: bool,
    /// Nobody wants its output any more (its caller was answered, or its consumer let go):
    /// output is acknowledged on arrival and dropped.
    discarding: bool,
    /// Output units received and not yet acknowledged.
    owed: usize,
    /// Stdin units agentd will still take.
    stdin_credit: usize,
    stdin_closed: bool,
    started: bool,
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
    /// agentd returned stdin credit for `id`: waiting writes may go out.
    StdinCredit {
        id: RequestId,
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
    /// Frames the core wants sent (output acknowledgements), taken by [`AgentCore::take_frames`].
    outgoing: Vec<Vec<u8>>,
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

    /// Starts an exec; returns its id, the request frame, and `spec.stdin` back: when it is
    /// `Some`, the exec reads stdin, which the caller sends with [`AgentCore::stdin`] as credit
    /// allows. A `streaming` exec's output comes as
    /// [`AgentEvent::Output`]; otherwise it is collected (bounded).
    pub fn exec(&mut self, mut spec: ExecSpec, streaming: bool) -> Result<(RequestId, Vec<u8>, Option<Vec<u8>>)> {
        if spec.stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN) {
            return Err(ExecError::Invalid(format!("stdin larger than {MAX_STDIN} bytes for a buffered exec")));
        }
        let id = self.next_id()?;
        let input = spec.stdin.take();
        let wants_stdin = input.is_some();
        let req = ExecRequest {
            id,
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            stdin: wants_stdin,
            tty: spec.tty,
            rlimits: spec.rlimits,
            restricted: spec.restricted,
        };
        req.validate().map_err(ExecError::Invalid)?;
        let frame = encode(&HostMsg::Exec(req)).map_err(|e| ExecError::Invalid(e.to_string()))?;
        let p = PendingExec { streaming, stdin_credit: STDIN_WINDOW, stdin_closed: !wants_stdin, ..Default::default() };
        self.execs.insert(id, p);
        Ok((id, frame, input))
    }

    /// More stdin for a running streaming exec (at most [`MAX_OUTPUT_CHUNK`] bytes); an empty
    /// `data` closes it. `Ok(None)`: agentd has no room for it yet (wait for
    /// [`AgentEvent::StdinCredit`] and ask again).
    pub fn stdin(&mut self, id: RequestId, data: &[u8]) -> Result<Option<Vec<u8>>> {
        if data.len() > MAX_OUTPUT_CHUNK {
            return Err(ExecError::Invalid(format!(
                "a stdin write of {} bytes exceeds {MAX_OUTPUT_CHUNK}",
                data.len()
            )));
        }
        let p = match self.execs.get_mut(&id) {
            Some(p) if !p.stdin_closed && !p.discarding => p,
            _ => return Err(ExecError::StdinClosed),
        };
        let units = cost(data.len());
        if units > p.stdin_credit {
            return Ok(None);
        }
        p.stdin_credit -= units;
        p.stdin_closed = data.is_empty();
        Ok(Some(encode(&HostMsg::Stdin { id, data: data.to_vec() }).expect("bounded chunk encodes")))
    }

    /// Whether exec `id` is still pending (its guest side has not reported its end).
    pub fn is_running(&self, id: RequestId) -> bool {
        self.execs.contains_key(&id)
    }

    /// The consumer of `id`'s output read one event of `bytes` bytes: acknowledge it.
    pub fn consumed(&mut self, id: RequestId, bytes: usize) {
        if let Some(p) = self.execs.get_mut(&id).filter(|p| !p.discarding) {
            let units = cost(bytes).min(p.owed);
            p.owed -= units;
            self.outgoing.push(ack(id, units));
        }
    }

    /// Nobody will read `id`'s output any more: acknowledge what is owed, and everything that
    /// still comes on arrival.
    pub fn discard(&mut self, id: RequestId) {
        if let Some(p) = self.execs.get_mut(&id).filter(|p| !p.discarding) {
            p.discarding = true;
            p.stdout = Vec::new();
            p.stderr = Vec::new();
            if p.owed > 0 {
                let units = std::mem::take(&mut p.owed);
                self.outgoing.push(ack(id, units));
            }
        }
    }

    /// Kills everything exec `id` started (its deadline passed): discards its output and
    /// returns the frame to send; `None` if it is no longer running.
    pub fn kill(&mut self, id: RequestId) -> Option<Vec<u8>> {
        self.discard(id);
        self.execs.get(&id).map(|_| encode(&HostMsg::Kill { id }).expect("small message encodes"))
    }

    /// Acknowledges everything `id` owes (its output was just taken care of).
    fn consumed_now(&mut self, id: RequestId) {
        if let Some(p) = self.execs.get_mut(&id) {
            let units = std::mem::take(&mut p.owed);
            self.outgoing.push(ack(id, units));
        }
    }

    /// Frames the core produced while consuming guest bytes or credit reports.
    pub fn take_frames(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outgoing)
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
            GuestMsg::Started { id, .. } => {
                let p = self.execs.get_mut(&id).ok_or_else(|| unknown(id))?;
                if std::mem::replace(&mut p.started, true) {
                    return Err(format!("guest reported exec {id} started twice"));
                }
                Ok(None)
            }
            GuestMsg::Output { id, stream, data } => {
                if data.is_empty() || data.len() > MAX_OUTPUT_CHUNK {
                    return Err(format!("output chunk of {} bytes is outside 1..={MAX_OUTPUT_CHUNK}", data.len()));
                }
                let p = self.execs.get_mut(&id).ok_or_else(|| unknown(id))?;
                p.owed += cost(data.len());
                if p.owed > OUTPUT_WINDOW {
                    return Err(format!(
                        "guest sent exec {id} {} units of output past its window of {OUTPUT_WINDOW}",
                        p.owed - OUTPUT_WINDOW
                    ));
                }
                if p.discarding {
                    self.consumed_now(id);
                    return Ok(None);
                }
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
                // Collected (or dropped past the cap): consumed.
                self.consumed_now(id);
                Ok(None)
            }
            GuestMsg::StdinAck { id, credit } => {
                // An acknowledgement may cross the exec's end on the wire: one for an exec
                // that is gone is dropped.
                let Some(p) = self.execs.get_mut(&id) else { return Ok(None) };
                let credit = usize::try_from(credit).unwrap_or(usize::MAX);
                p.stdin_credit = p.stdin_credit.saturating_add(credit);
                if p.stdin_credit > STDIN_WINDOW {
                    return Err(format!("guest returned more stdin credit for exec {id} than it was sent"));
                }
                Ok(Some(AgentEvent::StdinCredit { id }))
            }
            GuestMsg::Exited { id, status } => {
                let p = self.execs.remove(&id).ok_or_else(|| unknown(id))?;
                let result = if p.overflowed {
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

fn ack(id: RequestId, units: usize) -> Vec<u8> {
    encode(&HostMsg::OutputAck { id, credit: units as u64 }).expect("small message encodes")
}

/// Messages of the agent client actor.
pub enum AgentMsg {
    /// Bytes from the virtio-console shell.
    FromGuest(GuestBytes),
    /// The console shell, once it exists.
    Attach(DerivedActorRef<ToConsole>),
    /// Exec traffic from a `Sandbox` handle.
    Request(AgentRequest),
    /// From this actor's own timer: exec `id`'s deadline passed.
    Deadline(RequestId),
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

/// A streaming exec's consumer.
#[derive(Debug)]
struct StreamSink {
    events: MpscUnboundedSender<ExecEvent>,
}

/// Stdin of one exec waiting for guest credit: chunks of at most [`MAX_OUTPUT_CHUNK`] bytes
/// (an empty one closes stdin), each with the reply port to answer once it went out (none for
/// the chunks of an exec's initial stdin).
type StdinQueue = VecDeque<(Vec<u8>, Option<RpcReplyPort<Result<()>>>)>;

pub struct AgentClient;

#[derive(Default)]
pub struct AgentState {
    core: AgentCore,
    me: Option<ActorRef<AgentMsg>>,
    console: Option<DerivedActorRef<ToConsole>>,
    agent_name: Option<String>,
    ready_waiters: Vec<RpcReplyPort<Result<String>>>,
    exec_replies: HashMap<RequestId, RpcReplyPort<Result<ExecOutput>>>,
    shutdown_replies: HashMap<RequestId, RpcReplyPort<Result<()>>>,
    stopped: Option<(StopReason, String)>,
    /// Frames waiting for send credit (and their bytes), and bytes sent but not yet taken by
    /// the guest.
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    to_guest_in_flight: usize,
    exec_timeouts: HashMap<RequestId, Duration>,
    streams: HashMap<RequestId, StreamSink>,
    stdin_queues: HashMap<RequestId, StdinQueue>,
}

impl AgentState {
    fn send(&mut self, frame: Vec<u8>) {
        self.outbox_bytes += frame.len();
        self.outbox.push_back(frame);
        self.flush();
    }

    /// Sends the frames the core produced (output acknowledgements).
    fn send_core_frames(&mut self) {
        for f in self.core.take_frames() {
            self.send(f);
        }
    }

    /// Hands queued frames to the console while the guest keeps up (whole frames only).
    fn flush(&mut self) {
        let Some(c) = &self.console else { return };
        while let Some(f) = self.outbox.front() {
            if self.to_guest_in_flight > 0 && self.to_guest_in_flight + f.len() > TO_GUEST_WINDOW {
                break;
            }
            let f = self.outbox.pop_front().expect("front exists");
            self.outbox_bytes -= f.len();
            self.to_guest_in_flight += f.len();
            let _ = c.send_message(ToConsole::Bytes(f));
        }
    }

    /// Refuses a control request (signal, resize) while the guest leaves its channel unread.
    fn outbox_room(&self) -> Result<()> {
        if self.outbox_bytes > MAX_OUTBOX {
            return Err(ExecError::TooManyRequests { limit: MAX_OUTBOX as u64 });
        }
        Ok(())
    }

    fn failure(&self) -> ExecError {
        failure_of(&self.stopped, self.core.closed())
    }

    /// Starts an exec (buffered or streaming): sends its request, queues its stdin, and arms
    /// its deadline.
    fn start_exec(&mut self, mut spec: ExecSpec, streaming: bool) -> Result<RequestId> {
        if self.stopped.is_some() {
            return Err(self.failure());
        }
        let timeout = spec.timeout;
        if streaming {
            // A stream's stdin stays open for later writes.
            spec.stdin = Some(spec.stdin.unwrap_or_default());
        }
        let (id, frame, input) = self.core.exec(spec, streaming)?;
        self.send(frame);
        if let Some(input) = input {
            let mut q: StdinQueue = input.chunks(MAX_OUTPUT_CHUNK).map(|c| (c.to_vec(), None)).collect();
            if !streaming {
                q.push_back((Vec::new(), None));
            }
            self.stdin_queues.insert(id, q);
            self.pump_stdin(id);
        }
        if let Some(t) = timeout {
            self.exec_timeouts.insert(id, t);
            if let Some(me) = &self.me {
                let me = me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(t).await;
                    let _ = me.cast(AgentMsg::Deadline(id));
                });
            }
        }
        Ok(id)
    }

    /// Sends exec `id`'s waiting stdin while agentd has room for it, answering each write as
    /// it goes out.
    fn pump_stdin(&mut self, id: RequestId) {
        while let Some((data, _)) = self.stdin_queues.get(&id).and_then(|q| q.front()) {
            match self.core.stdin(id, data) {
                Ok(Some(frame)) => {
                    self.send(frame);
                    let (_, reply) = self.stdin_queues.get_mut(&id).and_then(|q| q.pop_front()).expect("front exists");
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(None) => return,
                Err(e) => return self.end_stdin(id, e),
            }
        }
        if self.stdin_queues.get(&id).is_some_and(|q| q.is_empty()) {
            self.stdin_queues.remove(&id);
        }
    }

    /// Answers every waiting stdin write of `id` with `err` (its exec ended or stopped reading).
    fn end_stdin(&mut self, id: RequestId, err: ExecError) {
        for (_, reply) in self.stdin_queues.remove(&id).unwrap_or_default() {
            if let Some(r) = reply {
                let _ = r.send(Err(err.clone()));
            }
        }
    }

    /// Queues a stdin write (answered once it went out), or refuses it.
    fn write_stdin(&mut self, id: RequestId, data: Vec<u8>, reply: RpcReplyPort<Result<()>>) {
        if data.len() > STDIN_CHUNK {
            let _ = reply
                .send(Err(ExecError::Invalid(format!("a stdin write of {} bytes exceeds {STDIN_CHUNK}", data.len()))));
            return;
        }
        if !self.core.is_running(id) {
            let _ = reply.send(Err(ExecError::StdinClosed));
            return;
        }
        let q = self.stdin_queues.entry(id).or_default();
        if q.iter().filter(|(_, r)| r.is_some()).count() >= MAX_PARKED_STDIN {
            let _ = reply.send(Err(ExecError::TooManyRequests { limit: MAX_PARKED_STDIN as u64 }));
            return;
        }
        q.push_back((data, Some(reply)));
        self.pump_stdin(id);
    }

    /// The deadline of exec `id` passed: answer its caller now and have agentd kill
    /// everything it started; what it still prints is dropped.
    fn deadline(&mut self, id: RequestId) {
        let Some(after) = self.exec_timeouts.remove(&id) else { return };
        if let Some(frame) = self.core.kill(id) {
            self.send(frame);
        }
        self.send_core_frames();
        self.end_stdin(id, ExecError::TimedOut { after });
        if let Some(r) = self.exec_replies.remove(&id) {
            let _ = r.send(Err(ExecError::TimedOut { after }));
        }
        if let Some(sink) = self.streams.remove(&id) {
            let _ = sink.events.send(ExecEvent::Failed(ExecError::TimedOut { after }));
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
        for (_, q) in self.stdin_queues.drain() {
            for (_, reply) in q {
                if let Some(r) = reply {
                    let _ = r.send(Err(err()));
                }
            }
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

    async fn pre_start(&self, me: ActorRef<AgentMsg>, _: ()) -> std::result::Result<AgentState, ActorProcessingErr> {
        Ok(AgentState { core: AgentCore::new(), me: Some(me), ..Default::default() })
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
                let events = st.core.on_bytes(&data);
                // Every byte is consumed at once: what the guest can make the host hold is
                // bounded per exec by the output window, not by stalling the channel.
                if let Some(c) = &st.console {
                    let _ = c.send_message(ToConsole::Credit(data.len()));
                }
                match events {
                    Ok(events) => {
                        for ev in events {
                            handle_event(st, ev);
                        }
                        st.send_core_frames();
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
            AgentMsg::Deadline(id) => st.deadline(id),
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
                st.streams.insert(id, StreamSink { events });
            }
            let _ = reply.send(started);
        }
        AgentRequest::Stdin { id, data, reply } => st.write_stdin(id, data, reply),
        AgentRequest::Signal { id, signal, reply } => {
            let r = st.outbox_room().and_then(|_| st.core.signal(id, signal)).map(|f| st.send(f));
            let _ = reply.send(r);
        }
        AgentRequest::Resize { id, size, reply } => {
            let r = st.outbox_room().and_then(|_| st.core.resize(id, size)).map(|f| st.send(f));
            let _ = reply.send(r);
        }
        AgentRequest::Consumed { id, bytes } => {
            st.core.consumed(id, bytes);
            st.send_core_frames();
        }
        AgentRequest::Release { id } => {
            st.streams.remove(&id);
            st.core.discard(id);
            st.send_core_frames();
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
            st.exec_timeouts.remove(&id);
            st.end_stdin(id, ExecError::StdinClosed);
            let result = result.map_err(|f| match f {
                ExecFailure::Spawn { kind, message } => ExecError::SpawnFailed { kind, message },
                ExecFailure::TooLarge => ExecError::OutputTooLarge { limit: MAX_BUFFERED_OUTPUT as u64 },
            });
            if let Some(r) = st.exec_replies.remove(&id) {
                let _ = r.send(result);
            } else if let Some(sink) = st.streams.remove(&id) {
                let _ = sink.events.send(match result {
                    Ok(out) => ExecEvent::Exited(out.status),
                    Err(e) => ExecEvent::Failed(e),
                });
            }
        }
        AgentEvent::Output { id, stream, data } => {
            let Some(sink) = st.streams.get_mut(&id) else {
                st.core.discard(id);
                return;
            };
            let ev = match stream {
                Stream::Stdout => ExecEvent::Stdout(data),
                Stream::Stderr => ExecEvent::Stderr(data),
            };
            if sink.events.send(ev).is_err() {
                // Nobody reads this stream any more: its output is dropped from now on.
                st.streams.remove(&id);
                st.core.discard(id);
            }
        }
        AgentEvent::StdinCredit { id } => st.pump_stdin(id),
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

    fn host(f: &[u8]) -> HostMsg {
        decode(&f[4..]).unwrap()
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

    fn output(id: RequestId, n: usize) -> Vec<u8> {
        frame(&GuestMsg::Output { id, stream: Stream::Stdout, data: vec![b'y'; n] })
    }

    #[test]
    fn exec_round_trip_collects_streams_separately() {
        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec { argv: vec!["echo".into()], ..Default::default() }, false).unwrap();
        let mut bytes = frame(&GuestMsg::Started { id, pid: 5 });
        bytes.extend(frame(&GuestMsg::Output { id, stream: Stream::Stdout, data: b"out".to_vec() }));
        bytes.extend(frame(&GuestMsg::Output { id, stream: Stream::Stderr, data: b"err".to_vec() }));
        bytes.extend(frame(&GuestMsg::Exited { id, status: ExitStatus::Code(42) }));
        let ev = c.on_bytes(&bytes).unwrap();
        let AgentEvent::ExecDone { result: Ok(out), .. } = &ev[0] else { panic!("{ev:?}") };
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
        assert_eq!(out.code(), Some(42));
        // Collected output is consumed at once: each chunk was acknowledged.
        let acks: Vec<HostMsg> = c.take_frames().iter().map(|f| host(f)).collect();
        assert_eq!(acks, vec![HostMsg::OutputAck { id, credit: cost(3) as u64 }; 2]);
    }

    #[test]
    fn stdin_goes_out_only_against_credit_the_guest_returns() {
        let mut c = ready_core();
        let spec = ExecSpec { argv: vec!["cat".into()], stdin: Some(vec![1, 2, 3]), ..Default::default() };
        let (id, f, input) = c.exec(spec, false).unwrap();
        assert!(matches!(host(&f), HostMsg::Exec(r) if r.stdin && r.id == id));
        assert_eq!(input, Some(vec![1, 2, 3]), "the stdin bytes are the caller's to send");
        let chunk = vec![7u8; MAX_OUTPUT_CHUNK];
        let fit = STDIN_WINDOW / cost(MAX_OUTPUT_CHUNK);
        for _ in 0..fit {
            let f = c.stdin(id, &chunk).unwrap().expect("within the window");
            assert_eq!(host(&f), HostMsg::Stdin { id, data: chunk.clone() });
        }
        assert_eq!(c.stdin(id, &chunk).unwrap(), None, "no room until the guest acknowledges");
        let ev = c.on_bytes(&frame(&GuestMsg::StdinAck { id, credit: cost(MAX_OUTPUT_CHUNK) as u64 })).unwrap();
        assert_eq!(ev, vec![AgentEvent::StdinCredit { id }]);
        assert!(c.stdin(id, &chunk).unwrap().is_some());
        // End of input, then nothing more.
        let mut c2 = ready_core();
        let (id2, _, _) =
            c2.exec(ExecSpec { argv: vec!["cat".into()], stdin: Some(vec![]), ..Default::default() }, true).unwrap();
        assert!(c2.stdin(id2, b"").unwrap().is_some());
        assert_eq!(c2.stdin(id2, b"x"), Err(ExecError::StdinClosed));
        assert!(matches!(c2.stdin(id2, &vec![0; MAX_OUTPUT_CHUNK + 1]), Err(ExecError::Invalid(_))));
        let too_big = ExecSpec { argv: vec!["cat".into()], stdin: Some(vec![0; MAX_STDIN + 1]), ..Default::default() };
        assert!(c.exec(too_big, false).is_err());
    }

    #[test]
    fn a_guest_returning_more_stdin_credit_than_it_was_sent_is_cut_off() {
        let mut c = ready_core();
        let (id, _, _) =
            c.exec(ExecSpec { argv: vec!["cat".into()], stdin: Some(vec![]), ..Default::default() }, true).unwrap();
        // Credit for an exec that is gone may cross its end on the wire: ignored.
        assert_eq!(c.on_bytes(&frame(&GuestMsg::StdinAck { id: 999, credit: 5 })).unwrap(), vec![]);
        let e = c.on_bytes(&frame(&GuestMsg::StdinAck { id, credit: 1 })).unwrap_err();
        assert!(e.contains("more stdin credit"), "{e}");
    }

    #[test]
    fn output_past_the_window_or_empty_closes_the_channel() {
        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec::command(["yes"]), true).unwrap();
        let fit = OUTPUT_WINDOW / cost(MAX_OUTPUT_CHUNK);
        for _ in 0..fit {
            assert_eq!(c.on_bytes(&output(id, MAX_OUTPUT_CHUNK)).unwrap().len(), 1);
        }
        assert!(c.take_frames().is_empty(), "a stream is acknowledged only as its consumer reads");
        // The consumer reads one chunk: exactly its cost comes back, and one more fits.
        c.consumed(id, MAX_OUTPUT_CHUNK);
        let acks: Vec<HostMsg> = c.take_frames().iter().map(|f| host(f)).collect();
        assert_eq!(acks, vec![HostMsg::OutputAck { id, credit: cost(MAX_OUTPUT_CHUNK) as u64 }]);
        c.on_bytes(&output(id, MAX_OUTPUT_CHUNK)).unwrap();
        let e = c.on_bytes(&output(id, MAX_OUTPUT_CHUNK)).unwrap_err();
        assert!(e.contains("past its window"), "{e}");

        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec::command(["yes"]), true).unwrap();
        let e = c.on_bytes(&output(id, 0)).unwrap_err();
        assert!(e.contains("outside 1..="), "an empty chunk is a violation: {e}");

        // Tiny chunks pay the frame cost: a flood of one-byte chunks hits the window as fast.
        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec::command(["yes"]), true).unwrap();
        let n = OUTPUT_WINDOW / cost(1);
        for _ in 0..n {
            c.on_bytes(&output(id, 1)).unwrap();
        }
        assert!(c.on_bytes(&output(id, 1)).is_err());
    }

    #[test]
    fn a_discarded_exec_is_acknowledged_on_arrival() {
        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec::command(["yes"]), true).unwrap();
        c.on_bytes(&output(id, 100)).unwrap();
        c.on_bytes(&output(id, 10)).unwrap();
        let kill = c.kill(id).expect("running");
        assert_eq!(host(&kill), HostMsg::Kill { id });
        let acks: Vec<HostMsg> = c.take_frames().iter().map(|f| host(f)).collect();
        assert_eq!(acks, vec![HostMsg::OutputAck { id, credit: (cost(100) + cost(10)) as u64 }], "what was owed");
        // Reads reported after the discard are not counted twice.
        c.consumed(id, 100);
        assert!(c.take_frames().is_empty());
        assert_eq!(c.on_bytes(&output(id, 5)).unwrap(), vec![], "dropped, not delivered");
        let acks: Vec<HostMsg> = c.take_frames().iter().map(|f| host(f)).collect();
        assert_eq!(acks, vec![HostMsg::OutputAck { id, credit: cost(5) as u64 }]);
        assert_eq!(c.stdin(id, b"x"), Err(ExecError::StdinClosed));
    }

    #[test]
    fn requests_before_ready_are_refused() {
        let mut c = AgentCore::new();
        assert!(c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }, false).is_err());
        let e = c.on_bytes(&frame(&GuestMsg::ShutdownAck { id: 1 })).unwrap_err();
        assert!(e.contains("before Ready"), "{e}");
    }

    #[test]
    fn unknown_ids_duplicates_and_garbage_close_the_channel() {
        let mut c = ready_core();
        let e = c.on_bytes(&frame(&GuestMsg::Exited { id: 99, status: ExitStatus::Code(0) })).unwrap_err();
        assert!(e.contains("99"), "{e}");
        assert!(c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }, false).is_err(), "closed for good");

        let mut c = ready_core();
        let (id, _, _) = c.exec(ExecSpec::command(["x"]), false).unwrap();
        c.on_bytes(&frame(&GuestMsg::Started { id, pid: 1 })).unwrap();
        let e = c.on_bytes(&frame(&GuestMsg::Started { id, pid: 1 })).unwrap_err();
        assert!(e.contains("twice"), "{e}");

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
        let (id, _, _) = c.exec(ExecSpec { argv: vec!["yes".into()], ..Default::default() }, false).unwrap();
        let chunk = output(id, MAX_OUTPUT_CHUNK);
        for _ in 0..(MAX_BUFFERED_OUTPUT / MAX_OUTPUT_CHUNK + 2) {
            c.on_bytes(&chunk).unwrap();
            c.take_frames();
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
        assert_eq!(c.kill(7), None);
    }

    #[test]
    fn pending_requests_are_bounded() {
        let mut c = ready_core();
        for _ in 0..MAX_PENDING {
            c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }, false).unwrap();
        }
        let e = c.exec(ExecSpec { argv: vec!["x".into()], ..Default::default() }, false).unwrap_err();
        assert_eq!(e, ExecError::TooManyRequests { limit: MAX_PENDING as u64 });
    }
}

#[cfg(test)]
mod actor_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Stands in for the console shell: keeps the credit it is given and the host messages.
    struct FakeConsole;
    #[derive(Default)]
    struct Seen {
        credit: usize,
        msgs: Vec<HostMsg>,
    }
    type Shared = Arc<Mutex<Seen>>;
    impl Actor for FakeConsole {
        type Msg = ToConsole;
        type State = Shared;
        type Arguments = Shared;
        async fn pre_start(
            &self,
            _: ActorRef<ToConsole>,
            n: Shared,
        ) -> std::result::Result<Shared, ActorProcessingErr> {
            Ok(n)
        }
        async fn handle(
            &self,
            _: ActorRef<ToConsole>,
            m: ToConsole,
            seen: &mut Shared,
        ) -> std::result::Result<(), ActorProcessingErr> {
            let mut seen = seen.lock().unwrap();
            match m {
                ToConsole::Credit(c) => seen.credit += c,
                ToConsole::Bytes(f) => seen.msgs.push(decode(&f[4..]).unwrap()),
            }
            Ok(())
        }
    }

    struct Rig {
        agent: ActorRef<AgentMsg>,
        requests: DerivedActorRef<AgentRequest>,
        seen: Shared,
    }

    impl Rig {
        async fn new() -> Rig {
            let seen = Shared::default();
            let (console, _) = Actor::spawn(None, FakeConsole, seen.clone()).await.unwrap();
            let (agent, _) = Actor::spawn(None, AgentClient, ()).await.unwrap();
            agent.cast(AgentMsg::Attach(console.get_derived())).unwrap();
            let rig = Rig { requests: agent.get_derived(), agent, seen };
            rig.guest(&GuestMsg::Ready {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                agent: "t".into(),
            });
            rig
        }

        fn guest(&self, m: &GuestMsg) {
            let data = encode(m).unwrap();
            // The fake guest takes every host byte at once.
            let drained = usize::MAX / 2;
            self.agent.cast(AgentMsg::FromGuest(GuestBytes { data, drained })).unwrap();
        }

        async fn stream(&self, argv: &[&str]) -> (RequestId, ractor::concurrency::MpscUnboundedReceiver<ExecEvent>) {
            let (events, rx) = ractor::concurrency::mpsc_unbounded();
            let (tx, id_rx) = ractor::concurrency::oneshot();
            let spec = ExecSpec::command(argv.iter().copied());
            self.requests.send_message(AgentRequest::ExecStream { spec, events, reply: tx.into() }).unwrap();
            (id_rx.await.unwrap().unwrap(), rx)
        }

        /// Waits until the agent has handled everything sent before.
        async fn settle(&self) {
            let (tx, rx) = ractor::concurrency::oneshot();
            self.requests.send_message(AgentRequest::WaitReady(tx.into())).unwrap();
            rx.await.unwrap().unwrap();
        }

        fn acked(&self, id: RequestId) -> u64 {
            let seen = self.seen.lock().unwrap();
            seen.msgs
                .iter()
                .map(|m| {
                    if let HostMsg::OutputAck { id: i, credit } = m {
                        if *i == id {
                            *credit
                        } else {
                            0
                        }
                    } else {
                        0
                    }
                })
                .sum()
        }

        fn sent(&self, pred: impl Fn(&HostMsg) -> bool) -> usize {
            self.seen.lock().unwrap().msgs.iter().filter(|m| pred(m)).count()
        }
    }

    #[tokio::test]
    async fn pending_exec_fails_with_the_stop_reason() {
        let rig = Rig::new().await;
        let (tx, rx) = ractor::concurrency::oneshot();
        rig.requests.send_message(AgentRequest::Exec { spec: ExecSpec::command(["x"]), reply: tx.into() }).unwrap();
        rig.agent.cast(AgentMsg::VmStopped(StopReason::GuestPowerOff, "tail".into())).unwrap();
        match rx.await.unwrap() {
            Err(ExecError::VmStopped { reason: StopReason::GuestPowerOff, console_tail }) => {
                assert_eq!(console_tail, "tail")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stalled_stream_stalls_only_itself() {
        let rig = Rig::new().await;
        let (stalled, _stalled_rx) = rig.stream(&["yes"]).await;
        let (live, mut live_rx) = rig.stream(&["yes"]).await;
        let fit = OUTPUT_WINDOW / cost(MAX_OUTPUT_CHUNK);
        let chunk = GuestMsg::Output { id: stalled, stream: Stream::Stdout, data: vec![b'y'; MAX_OUTPUT_CHUNK] };
        for _ in 0..fit {
            rig.guest(&chunk);
        }
        // The live stream keeps moving: each chunk read is acknowledged to the guest.
        for _ in 0..3 * fit {
            rig.guest(&GuestMsg::Output { id: live, stream: Stream::Stdout, data: vec![b'z'; MAX_OUTPUT_CHUNK] });
            let Some(ExecEvent::Stdout(d)) = live_rx.recv().await else { panic!() };
            let (tx, rx) = ractor::concurrency::oneshot::<()>();
            rig.requests.send_message(AgentRequest::Consumed { id: live, bytes: d.len() }).unwrap();
            drop((tx, rx));
        }
        rig.settle().await;
        assert_eq!(rig.acked(live), (3 * fit * cost(MAX_OUTPUT_CHUNK)) as u64);
        assert_eq!(rig.acked(stalled), 0, "an unread stream gets no credit back");
        // The channel itself is never held back.
        let seen_credit = rig.seen.lock().unwrap().credit;
        let all: usize = (4 * fit) * encode(&chunk).unwrap().len()
            + encode(&GuestMsg::Ready {
                min_version: PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                agent: "t".into(),
            })
            .unwrap()
            .len();
        assert_eq!(seen_credit, all);
        // Its consumer lets go: what it owed is acknowledged and later output is dropped.
        rig.requests.send_message(AgentRequest::Release { id: stalled }).unwrap();
        rig.settle().await;
        assert_eq!(rig.acked(stalled), (fit * cost(MAX_OUTPUT_CHUNK)) as u64);
        rig.guest(&chunk);
        rig.settle().await;
        assert_eq!(rig.acked(stalled), ((fit + 1) * cost(MAX_OUTPUT_CHUNK)) as u64);
    }

    #[tokio::test]
    async fn stdin_writes_are_answered_once_the_guest_has_room() {
        let rig = Rig::new().await;
        let (id, _rx) = rig.stream(&["cat"]).await;
        let chunk = vec![1u8; STDIN_CHUNK];
        let fit = STDIN_WINDOW / cost(STDIN_CHUNK);
        let mut replies = Vec::new();
        for _ in 0..fit + 2 {
            let (tx, rx) = ractor::concurrency::oneshot();
            rig.requests.send_message(AgentRequest::Stdin { id, data: chunk.clone(), reply: tx.into() }).unwrap();
            replies.push(rx);
        }
        rig.settle().await;
        let mut waiting = replies.split_off(fit);
        for r in replies {
            r.await.unwrap().unwrap();
        }
        assert!(waiting[0].try_recv().is_err(), "a write past the window waits");
        assert_eq!(rig.sent(|m| matches!(m, HostMsg::Stdin { .. })), fit);
        // More writes than may wait are refused, not queued.
        let mut refused = Vec::new();
        for _ in 0..MAX_PARKED_STDIN {
            let (tx, rx) = ractor::concurrency::oneshot();
            rig.requests.send_message(AgentRequest::Stdin { id, data: chunk.clone(), reply: tx.into() }).unwrap();
            refused.push(rx);
        }
        let last = refused.pop().unwrap().await.unwrap();
        assert_eq!(last, Err(ExecError::TooManyRequests { limit: MAX_PARKED_STDIN as u64 }));
        // The guest moves one chunk into the pipe: one waiting write goes out.
        rig.guest(&GuestMsg::StdinAck { id, credit: cost(STDIN_CHUNK) as u64 });
        waiting.remove(0).await.unwrap().unwrap();
        assert_eq!(rig.sent(|m| matches!(m, HostMsg::Stdin { .. })), fit + 1);
        // The exec ends: writes still waiting learn that stdin is closed.
        rig.guest(&GuestMsg::Exited { id, status: msb_protocol::ExitStatus::Code(0) });
        assert_eq!(waiting.remove(0).await.unwrap(), Err(ExecError::StdinClosed));
    }

    #[tokio::test]
    async fn the_host_enforces_the_deadline_when_the_guest_does_not() {
        let rig = Rig::new().await;
        let (tx, rx) = ractor::concurrency::oneshot();
        let spec = ExecSpec { timeout: Some(Duration::from_millis(200)), ..ExecSpec::command(["sleep", "600"]) };
        let started = std::time::Instant::now();
        rig.requests.send_message(AgentRequest::Exec { spec, reply: tx.into() }).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), rx).await.expect("answered").unwrap();
        assert_eq!(r.unwrap_err(), ExecError::TimedOut { after: Duration::from_millis(200) });
        assert!(started.elapsed() >= Duration::from_millis(200));
        rig.settle().await;
        assert_eq!(rig.sent(|m| matches!(m, HostMsg::Kill { id: 1 })), 1, "agentd is told to kill the exec");
        // Whatever the guest still says about it is accepted and dropped.
        rig.guest(&GuestMsg::Output { id: 1, stream: Stream::Stdout, data: b"late".to_vec() });
        rig.guest(&GuestMsg::Exited { id: 1, status: msb_protocol::ExitStatus::Signal(9) });
        rig.settle().await;
        assert_eq!(rig.acked(1), cost(4) as u64);

        // A stream gets the same answer as its last event.
        let (tx, id_rx) = ractor::concurrency::oneshot();
        let (events, mut rx) = ractor::concurrency::mpsc_unbounded();
        let spec = ExecSpec { timeout: Some(Duration::from_millis(100)), ..ExecSpec::command(["sleep", "600"]) };
        rig.requests.send_message(AgentRequest::ExecStream { spec, events, reply: tx.into() }).unwrap();
        id_rx.await.unwrap().unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap();
        assert_eq!(ev, Some(ExecEvent::Failed(ExecError::TimedOut { after: Duration::from_millis(100) })));
    }
}
