//! agentd: PID 1 of every sandbox.
//!
//! Boot: mount /proc, /sys, /dev (+ /dev/pts), /tmp and /run; mark the boot timer; with
//! `msb.root=overlay` make the image's overlay the root (system.rs); open the
//! agent channel (the virtio-console port named `msb.agent`); send [`GuestMsg::Ready`]; then serve host requests
//! until told to shut down. As PID 1 it also reaps every orphan.
//!
//! Invariants: the host is trusted, but agentd still validates every request before acting
//! on it; at most [`MAX_SESSIONS`] commands run at once; output is sent in chunks of at most
//! [`MAX_OUTPUT_CHUNK`] bytes, so no frame exceeds the protocol's bound, and only against the
//! session's output credit; the port reader never blocks on one session (stdin is queued
//! within the session's stdin window, see exec.rs). This crate has no
//! `unsafe`: system calls go through `nix` and `rustix`.

#![forbid(unsafe_code)]

mod ca;
mod exec;
mod files;
mod helper;
mod reaper;
mod system;
mod users;

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use msb_protocol::{
    decode, encode, FrameDecoder, GuestMsg, HostMsg, MAX_OUTPUT_CHUNK, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Most commands running at once.
pub const MAX_SESSIONS: usize = 256;

/// Sends frames to the host; shared by every session thread.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
    pub fn send(&self, msg: &GuestMsg) {
        let frame = match encode(msg) {
            Ok(f) => f,
            Err(e) => return log(&format!("cannot encode reply: {e}")),
        };
        let mut f = msb_protocol::sync::lock(&self.0);
        if let Err(e) = f.write_all(&frame) {
            log(&format!("agent channel write failed: {e}"));
        }
    }
}

pub fn log(msg: &str) {
    eprintln!("msb-agentd: {msg}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(helper::FLAG) {
        helper::main(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(files::FLAG) {
        files::main(&args[1..]);
    }
    if args.first().map(String::as_str) == Some(ca::FLAG) {
        ca::main(&args[1..]);
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        // The first thing on the console: benchmarks that cannot see our boot timer (QEMU)
        // time the guest's init by this line.
        log("init");
        system::early_setup();
        let net = system::configure_network();
        if system::image_root_requested() {
            if let Err(e) = system::switch_to_image_root() {
                log(&format!("fatal: cannot boot into the image: {e}"));
                system::power_off();
            }
        }
        if let Some(net) = &net {
            system::write_resolv_conf(net);
        }
        if let Err(e) = system::mount_shared_dirs() {
            log(&format!("fatal: cannot mount a shared directory: {e}"));
            system::power_off();
        }
        // Last: everything above may write the root.
        if system::read_only_requested() {
            if let Err(e) = system::make_root_read_only() {
                log(&format!("fatal: cannot make the root read-only: {e}"));
                system::power_off();
            }
        }
    }
    let result = serve();
    if let Err(e) = &result {
        log(&format!("fatal: {e}"));
    }
    if pid1 {
        system::power_off();
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

fn serve() -> Result<(), String> {
    let path = std::env::var("MSB_AGENT_CHANNEL").ok();
    let chan = system::open_channel(path.as_deref())?;
    let mut reader = chan.try_clone().map_err(|e| format!("cloning channel: {e}"))?;
    let sender = Sender(Arc::new(Mutex::new(chan)));
    let reaper = reaper::Reaper::start();
    let stdins = exec::Stdins::default();
    sender.send(&GuestMsg::Ready {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent: format!("msb-agentd {}", env!("CARGO_PKG_VERSION")),
    });
    log("ready");

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    let mut negotiated = false;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Err("agent channel closed".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("agent channel read: {e}")),
        };
        let mut frames = Vec::new();
        decoder.feed(&buf[..n], &mut |f| frames.push(f)).map_err(|e| e.to_string())?;
        for frame in frames {
            let msg: HostMsg = match decode(&frame) {
                Ok(m) => m,
                Err(e) => {
                    sender.send(&GuestMsg::Error { message: e.to_string() });
                    return Err(e.to_string());
                }
            };
            match msg {
                HostMsg::Hello { version } => {
                    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                        return Err(format!("host picked unsupported protocol version {version}"));
                    }
                    negotiated = true;
                }
                _ if !negotiated => {
                    sender.send(&GuestMsg::Error { message: "request before Hello".into() });
                }
                HostMsg::Exec(req) => exec::start(req, sender.clone(), reaper.clone(), stdins.clone()),
                HostMsg::Stdin { id, data } => exec::feed_stdin(&stdins, &sender, id, data),
                HostMsg::OutputAck { id, credit } => exec::output_ack(&stdins, id, credit),
                HostMsg::Kill { id } => exec::kill(&stdins, id),
                HostMsg::Signal { id, signal } => exec::signal(&stdins, id, signal),
                HostMsg::Resize { id, size } => exec::resize(&stdins, id, size),
                HostMsg::Shutdown { id } => {
                    nix::unistd::sync();
                    sender.send(&GuestMsg::ShutdownAck { id });
                    return Ok(());
                }
            }
        }
    }
}
