//! How the CLI reports a failure: the error's message followed by each cause in its
//! `source()` chain (library errors never repeat a cause in their own message), and, where
//! one exists, a remedy for a person. Remedies live here, keyed on the error's variant, not
//! in the libraries (a Rust API user gets no shell advice).

use std::error::Error as StdError;

use msb_control_plane::schema::limits::{SizeError, MEMORY_MIB, VCPUS};
use msb_control_plane::store::Action;
use msb_control_plane::{Error, ExecError, StoreError};
use msb_images::Artifact;

/// Text for a terminal: control characters (terminal escapes among them) that a guest may
/// have put into a log line, a console tail or an error message are shown as `\xNN` /
/// `\u{NN}` instead of being sent to the terminal. Newlines and tabs stay as they are.
pub fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if ('\u{80}'..='\u{9f}').contains(&c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The message and every cause, joined by ": ".
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // A transparent wrapper shows its inner error's message: do not print it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// What to do about an error of the named-sandbox commands, if there is something.
pub fn remedy(e: &Error) -> Option<String> {
    match e {
        Error::Store(StoreError::Exists(name)) => Some(format!("pick another name or remove it with `msb rm {name}`")),
        Error::Store(StoreError::NotFound(_)) => Some("`msb ls` lists them".into()),
        Error::Store(StoreError::WrongStatus { action, status, .. }) => Some(match action {
            Action::Start => "`msb stop` it first".into(),
            Action::Remove => "stop it first, or use `msb rm --force`".into(),
            Action::Connect if status.is_live() => "it is still starting; retry in a moment".into(),
            Action::Connect => "start it with `msb start`".into(),
        }),
        Error::Exec(e) => exec_remedy(e),
        Error::Size(e) => Some(size_remedy(e)),
        _ => None,
    }
}

fn size_remedy(e: &SizeError) -> String {
    match e {
        SizeError::Vcpus(_) => format!("choose --cpus {} to {}", VCPUS.start(), VCPUS.end()),
        SizeError::Memory(_) => format!("choose --memory {} to {} (MiB)", MEMORY_MIB.start(), MEMORY_MIB.end()),
    }
}

fn exec_remedy(e: &ExecError) -> Option<String> {
    match e {
        ExecError::OutputTooLarge { .. } => {
            Some("stream it instead (`msb exec` prints as it runs) or print less".into())
        }
        ExecError::VmStopped { console_tail, .. } if console_tail.trim().is_empty() => Some(kernel_log_hint()),
        _ => None,
    }
}

fn kernel_log_hint() -> String {
    "to see the guest kernel's log, rerun with `--kernel-args loglevel=7`".into()
}

/// What to do about a missing boot artifact.
pub fn artifact_remedy(what: Artifact) -> &'static str {
    match what {
        Artifact::Kernel => {
            "build it with `guest/kernel/build.sh guest \"$MSB_HOME/kernel\"` (or run `scripts/setup.sh`)"
        }
        Artifact::Agentd => "build and install it with `scripts/build-static.sh` (or run `scripts/setup.sh`)",
        Artifact::Busybox => "install Debian's busybox-static",
    }
}

/// What to do about a sandbox that could not be built or booted (in the sandbox process).
pub fn boot_remedy(e: &msb_actors::Error) -> Option<String> {
    match e {
        msb_actors::Error::Artifacts(msb_images::Error::Missing { what, .. }) => Some(artifact_remedy(*what).into()),
        msb_actors::Error::Machine(msb_devices_error) if opens_kvm(msb_devices_error) => {
            Some("is KVM available, and can you read and write /dev/kvm? `msb doctor` says".into())
        }
        msb_actors::Error::BootTimeout { console_tail, .. } if console_tail.trim().is_empty() => {
            Some(kernel_log_hint())
        }
        msb_actors::Error::Exec(e) => exec_remedy(e),
        msb_actors::Error::Size(e) => Some(size_remedy(e)),
        _ => None,
    }
}

fn opens_kvm(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if matches!(c.downcast_ref::<msb_hypervisor::Error>(), Some(msb_hypervisor::Error::OpenKvm(_))) {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The whole report, safe for a terminal: chain, then the remedy after "; ".
pub fn with_remedy(e: &(dyn StdError + 'static), remedy: Option<String>) -> String {
    let text = match remedy {
        Some(r) => format!("{}; {r}", chain(e)),
        None => chain(e),
    };
    for_terminal(&text)
}

/// The report of a named-sandbox command's error.
pub fn message(e: &Error) -> String {
    with_remedy(e, remedy(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once_each() {
        let io = std::io::Error::other("disk on fire");
        let e = msb_images::Error::Io { what: "reading", path: "/x".into(), source: io };
        assert_eq!(chain(&e), "reading /x: disk on fire");
        let e = Error::Store(StoreError::NotFound("web".into()));
        assert_eq!(message(&e), "no sandbox named \"web\"; `msb ls` lists them");
    }

    #[test]
    fn guest_bytes_cannot_drive_the_terminal() {
        assert_eq!(for_terminal("ok\tline\n"), "ok\tline\n");
        assert_eq!(for_terminal("\x1b]0;pwned\x07\x1b[2J"), "\\x1b]0;pwned\\x07\\x1b[2J");
        assert_eq!(for_terminal("a\u{9b}31mb\rc\x7f"), "a\\u{9b}31mb\\x0dc\\x7f");
        let e =
            ExecError::VmStopped { reason: msb_control_plane::StopReason::GuestPanic, console_tail: "\x1b[31m".into() };
        assert!(message(&Error::Exec(e)).ends_with("\\x1b[31m"));
    }

    #[test]
    fn remedies_follow_the_variant() {
        let e = Error::Store(StoreError::Exists("a".into()));
        assert!(message(&e).ends_with("`msb rm a`"), "{}", message(&e));
        let e = Error::Store(StoreError::WrongStatus {
            name: "a".into(),
            status: msb_control_plane::Status::Stopped,
            action: Action::Connect,
        });
        assert!(message(&e).contains("is stopped") && message(&e).contains("msb start"), "{}", message(&e));
        let e = ExecError::VmStopped { reason: msb_control_plane::StopReason::Killed, console_tail: String::new() };
        assert!(message(&Error::Exec(e)).contains("loglevel=7"));
        let e = msb_actors::Error::Artifacts(msb_images::Error::Missing { what: Artifact::Kernel, path: "/k".into() });
        assert!(with_remedy(&e, boot_remedy(&e)).contains("build.sh"));
    }
}
