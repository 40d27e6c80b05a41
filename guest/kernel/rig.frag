# Rig (L1) kernel: the guest fragment plus KVM with emulated AMD-V, so that our VMM can boot
# real L2 guests inside QEMU TCG on a host whose own /dev/kvm is a software hypervisor.
CONFIG_HIGH_RES_TIMERS=y
CONFIG_VIRTUALIZATION=y
CONFIG_KVM=y
CONFIG_KVM_AMD=y
CONFIG_KVM_WERROR=n
