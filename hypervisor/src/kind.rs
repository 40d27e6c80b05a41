//! What kind of `/dev/kvm` this host has, and therefore what can run on it.

use std::path::Path;

/// The host's KVM, as far as msb can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization with AMD-V (`svm`).
    HardwareAmd,
    /// Hardware virtualization with Intel VT-x (`vmx`).
    HardwareIntel,
    /// The PVM software hypervisor: ordinary guests are instruction-emulated (~2 MIPS), so a
    /// standard Linux guest never finishes booting; tiny bare-metal test guests do run.
    Pvm,
    /// `/dev/kvm` exists but neither hardware flags nor PVM were found.
    Unknown,
    /// No `/dev/kvm`.
    Missing,
}

impl KvmKind {
    /// Whether a standard Linux guest boots at useful speed.
    pub fn boots_linux(self) -> bool {
        matches!(self, KvmKind::HardwareAmd | KvmKind::HardwareIntel)
    }

    /// One sentence for users.
    pub fn describe(self) -> &'static str {
        match self {
            KvmKind::HardwareAmd => "hardware virtualization (AMD-V): sandboxes boot directly",
            KvmKind::HardwareIntel => "hardware virtualization (Intel VT-x): sandboxes boot directly",
            KvmKind::Pvm => {
                "PVM software hypervisor: a standard guest kernel is instruction-emulated and never \
                 finishes booting; run sandboxes on hardware KVM or through the TCG rig (tests/rig)"
            }
            KvmKind::Unknown => "/dev/kvm of unknown kind: neither svm/vmx nor PVM was detected",
            KvmKind::Missing => "no /dev/kvm: enable KVM (load kvm_amd or kvm_intel) or use a machine with it",
        }
    }
}

/// Classifies this host's `/dev/kvm` from `/proc/cpuinfo` and `/sys/module`.
pub fn classify() -> KvmKind {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify_from(Path::new("/dev/kvm").exists(), Path::new("/sys/module/kvm_pvm").exists(), &cpuinfo)
}

/// The decision, separated from the file system so that it can be tested.
pub fn classify_from(dev_exists: bool, pvm_loaded: bool, cpuinfo: &str) -> KvmKind {
    if !dev_exists {
        return KvmKind::Missing;
    }
    if pvm_loaded {
        return KvmKind::Pvm;
    }
    let flags =
        cpuinfo.lines().find(|l| l.starts_with("flags")).and_then(|l| l.split_once(':')).map(|(_, f)| f).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    if has("svm") {
        KvmKind::HardwareAmd
    } else if has("vmx") {
        KvmKind::HardwareIntel
    } else {
        KvmKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let amd = "processor: 0\nflags\t\t: fpu vme svm npt\n";
        let intel = "flags\t\t: fpu vmx ept\n";
        let none = "flags\t\t: fpu hypervisor\n";
        assert_eq!(classify_from(false, false, amd), KvmKind::Missing);
        assert_eq!(classify_from(true, true, amd), KvmKind::Pvm, "PVM wins over flags");
        assert_eq!(classify_from(true, false, amd), KvmKind::HardwareAmd);
        assert_eq!(classify_from(true, false, intel), KvmKind::HardwareIntel);
        assert_eq!(classify_from(true, false, none), KvmKind::Unknown);
        assert_eq!(classify_from(true, false, "flags: svmx\n"), KvmKind::Unknown, "whole words only");
        assert!(KvmKind::HardwareAmd.boots_linux());
        assert!(!KvmKind::Pvm.boots_linux());
    }
}
