# Rig (L1) kernel: the guest fragment plus KVM with emulated AMD-V, so that our VMM can boot
# real L2 guests inside QEMU TCG on a host whose own /dev/kvm is a software hypervisor.
CONFIG_HIGH_RES_TIMERS=y
CONFIG_VIRTUALIZATION=y
CONFIG_KVM=y
CONFIG_KVM_AMD=y
CONFIG_KVM_WERROR=n
# The rig's L1 keeps its i8042: the harness's periodic keyboard kick through QEMU's monitor
# works around a QEMU 7.2 TCG lost-interrupt freeze (shared/research/tcg-rig.md §3.2).
CONFIG_SERIO_I8042=y
CONFIG_INPUT_KEYBOARD=y
CONFIG_KEYBOARD_ATKBD=y
CONFIG_INPUT=y
CONFIG_SERIO=y
# The network e2e tests' hosts live in network namespaces of L1 on veth pairs.
CONFIG_VETH=y
# The network benchmark's passt isolates itself in a user namespace.
CONFIG_USER_NS=y
# The sandbox process's lockdown (shared/research/hardening.md): Landlock (ABI v2 on 6.1) and
# seccomp filters, so the rig tests the enforced path, not only the degraded one.
CONFIG_SECURITY=y
CONFIG_SECURITY_LANDLOCK=y
CONFIG_SECCOMP=y
CONFIG_SECCOMP_FILTER=y
