//! Identifying a sandbox process: its pid plus its start time, read from `/proc/PID/stat`
//! (parsed in one place), so that a recycled pid is never mistaken for it.

use serde::{Deserialize, Serialize};

/// A sandbox process: pid plus its start time (clock ticks since boot, `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start: u64,
}

/// The fields of `/proc/PID/stat` msb reads.
struct Stat {
    state: char,
    start: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// The command name of `pid` (`/proc/PID/stat`'s second field, at most 15 bytes).
fn comm(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(text[text.find('(')? + 1..text.rfind(')')?].to_string())
}

/// Parses one `/proc/PID/stat` line. The command name may contain spaces and parentheses:
/// fields resume after the last ')'; the state is the first of them, the start time the 20th.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start })
}

impl ProcessId {
    /// The calling process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// Process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        stat(pid).map(|s| ProcessId { pid, start: s.start })
    }

    /// Whether this very process still runs (see [`ProcessId::is_alive`]), as this user, from
    /// the executable `exe` (or from what was at that path when it started).
    pub fn is_our_process(&self, exe: &std::path::Path) -> bool {
        if !self.is_alive() {
            return false;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1));
        let me = rustix::process::geteuid().as_raw().to_string();
        if uid != Some(me.as_str()) {
            return false;
        }
        // A locked-down sandbox process is not dumpable (its `exe` link is closed to its own
        // user) and runs in its own mount namespace (the link may name its binary by a path of
        // that namespace). Its pid and start time already name it; then its command name must
        // agree with the binary's.
        let want = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        if let Ok(running) = std::fs::read_link(format!("/proc/{}/exe", self.pid)) {
            let running = running.to_string_lossy();
            if running == want.to_string_lossy() || running.strip_suffix(" (deleted)") == Some(&*want.to_string_lossy())
            {
                return true;
            }
        }
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        comm(self.pid).is_some_and(|c| !c.is_empty() && name.starts_with(&c))
    }

    /// Whether this very process still runs (and is not a zombie).
    pub fn is_alive(&self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start && !matches!(s.state, 'Z' | 'X'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_parentheses_and_spaces_parses() {
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.start), ('S', 123456));
        assert!(parse_stat("42 (x").is_none());
    }

    #[test]
    fn only_a_process_of_the_expected_binary_counts_as_ours() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_our_process(&std::env::current_exe().unwrap()));
        assert!(!me.is_our_process(std::path::Path::new("/bin/true")));
        let pid1 = ProcessId::of(1).unwrap();
        assert!(!pid1.is_our_process(&std::env::current_exe().unwrap()));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let p = ProcessId::of(child.id()).unwrap();
        // Exited but not reaped: a zombie until wait().
        while stat(p.pid).is_some_and(|s| s.state != 'Z') {
            std::thread::yield_now();
        }
        assert!(!p.is_alive());
        child.wait().unwrap();
        assert!(!p.is_alive());
    }
}
