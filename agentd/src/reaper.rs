//! Reaps every child of PID 1. Sessions register their child's pid (while holding the table
//! lock across the spawn, so an early exit cannot be missed) and receive its exit status;
//! anything else reaped is an orphan and is dropped.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use msb_protocol::ExitStatus;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, mpsc::Sender<ExitStatus>>,
}

#[derive(Clone)]
pub struct Reaper {
    table: Arc<(Mutex<Table>, Condvar)>,
}

impl Reaper {
    pub fn start() -> Self {
        let r = Reaper { table: Arc::default() };
        let r2 = r.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || r2.run()).expect("spawn reaper");
        r
    }

    /// Runs `spawn` with the table locked and registers the pid it returns.
    pub fn spawn_registered<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(T, u32)>,
    ) -> std::io::Result<(T, mpsc::Receiver<ExitStatus>)> {
        let (lock, cv) = &*self.table;
        let mut t = msb_protocol::sync::lock(lock);
        let (v, pid) = spawn()?;
        let (tx, rx) = mpsc::channel();
        t.waiting.insert(pid as i32, tx);
        cv.notify_all();
        Ok((v, rx))
    }

    fn run(&self) {
        let (lock, cv) = &*self.table;
        loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.deliver(pid, ExitStatus::Signal(sig as i32)),
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => {
                    // No children at all: sleep until a session spawns one.
                    let t = msb_protocol::sync::lock(lock);
                    let _ = cv.wait_timeout(t, Duration::from_secs(1));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn deliver(&self, pid: Pid, status: ExitStatus) {
        let (lock, _) = &*self.table;
        let tx = msb_protocol::sync::lock(lock).waiting.remove(&pid.as_raw());
        if let Some(tx) = tx {
            let _ = tx.send(status);
        }
    }
}
