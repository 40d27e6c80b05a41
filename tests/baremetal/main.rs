//! Bare-metal VMM tests: tiny 32-bit guests, assembled here with GNU `as` and linked as PVH
//! ELFs, run on our real VMM under this host's `/dev/kvm`. Even instruction-emulated (PVM)
//! they finish in moments. Each drives the virtio-console device directly: the happy path
//! (a protocol `Ready` frame through the transmit queue, an ioeventfd notification, the agent
//! handshake) and the adversarial paths (bad descriptor addresses, a descriptor loop, an
//! oversized frame, a bogus queue size), plus the guest-initiated stops.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use msb_actors::{Error, ExecError, Sandbox, StopReason};
use msb_protocol::{encode, GuestMsg, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, VIRTIO_MMIO_BASE};

/// How the guest posts its one transmit buffer, and what it does afterwards.
struct Variant {
    payload: Vec<u8>,
    desc_addr: String,
    desc_flags: u16,
    queue_size: u32,
    /// Guest physical address of the transmit queue's descriptor table.
    desc_table: u32,
    /// Assembly run after the one descriptor is posted and before the queue is notified (to
    /// post something else instead).
    extra: String,
    finish: &'static str,
}

const HALT: &str = "mov $msg_halt, %esi\n call puts";
const RESET: &str = "mov $0xfe, %al\n out %al, $0x64";
/// Adversarial guests just halt afterwards, so that only the host decides how the VM ends.
const IDLE: &str = "";

fn ready_frame() -> Vec<u8> {
    encode(&GuestMsg::Ready {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent: "bare-metal".into(),
    })
    .unwrap()
}

impl Variant {
    fn happy(finish: &'static str) -> Self {
        Variant {
            payload: ready_frame(),
            desc_addr: "$payload".into(),
            desc_flags: 0,
            queue_size: 8,
            desc_table: 0x300000,
            extra: String::new(),
            finish,
        }
    }

    fn source(&self) -> String {
        let bytes: Vec<String> = self.payload.iter().map(|b| b.to_string()).collect();
        format!(
            r#"
.set BASE, {base:#x}
.set DESC, {desc_table:#x}
.set AVAIL, 0x301000
.set USED, 0x302000
.section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18
    .asciz "Xen"
    .align 4
    .long _start
.text
.code32
.globl _start
_start:
    cli
    mov $0x200000, %esp
    mov $msg_start, %esi
    call puts
    mov $BASE, %ebx
    movl $0, 0x70(%ebx)
    movl $1, 0x70(%ebx)
    movl $3, 0x70(%ebx)
    movl $1, 0x24(%ebx)
    movl $1, 0x20(%ebx)
    movl $0, 0x24(%ebx)
    movl $0, 0x20(%ebx)
    movl $0xb, 0x70(%ebx)
    movl $1, 0x30(%ebx)
    movl ${qsize}, 0x38(%ebx)
    movl $DESC, 0x80(%ebx)
    movl $0, 0x84(%ebx)
    movl $AVAIL, 0x90(%ebx)
    movl $0, 0x94(%ebx)
    movl $USED, 0xa0(%ebx)
    movl $0, 0xa4(%ebx)
    movl $1, 0x44(%ebx)
    movl $0xf, 0x70(%ebx)
    movl {addr}, DESC
    movl $0, DESC+4
    movl ${len}, DESC+8
    movw ${flags}, DESC+12
    movw $0, DESC+14
    movw $0, AVAIL
    movw $0, AVAIL+4
    movw $1, AVAIL+2
    {extra}
    movl $1, 0x50(%ebx)
wait:
    cmpw $0, USED+2
    je wait
    {finish}
1:  hlt
    jmp 1b
puts:
    lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    jmp puts
2:  ret
msg_start: .asciz "bare-metal guest: start\n"
msg_halt: .asciz "reboot: System halted\n"
payload: .byte {bytes}
"#,
            base = VIRTIO_MMIO_BASE,
            qsize = self.queue_size,
            desc_table = self.desc_table,
            addr = self.desc_addr,
            len = self.payload.len(),
            flags = self.desc_flags,
            finish = self.finish,
            extra = self.extra,
            bytes = bytes.join(","),
        )
    }
}

/// Assembles and links a variant into `dir`, returning the ELF path.
fn build(dir: &Path, name: &str, v: &Variant) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&src, v.source()).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e} (install binutils)"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld").args(["-m", "elf_x86_64", "-Ttext=0x100000", "-e", "_start", "-o"]).arg(&elf).arg(&obj));
    elf
}

async fn create(name: &str, v: Variant) -> (msb_actors::Result<Sandbox>, tempfile::TempDir) {
    msb_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let elf = build(dir.path(), name, &v);
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"none").unwrap();
    let sb = Sandbox::builder()
        .memory_mib(64)
        .kernel(elf)
        .initramfs(initrd)
        .boot_timeout(Duration::from_secs(30))
        .create()
        .await;
    (sb, dir)
}

fn stop_reason(r: msb_actors::Result<Sandbox>) -> (StopReason, String) {
    match r {
        Err(Error::Exec(ExecError::VmStopped { reason, console_tail })) => (reason, console_tail),
        Err(e) => panic!("expected the VM to be stopped, got error {e}"),
        Ok(_) => panic!("expected the VM to be stopped, but the agent became ready"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_frame_through_virtio_console_then_guest_halts() {
    let (sb, _dir) = create("happy", Variant::happy(HALT)).await;
    let sb = sb.expect("the bare-metal guest's Ready frame completes the handshake");
    assert_eq!(sb.wait().await.unwrap(), StopReason::GuestPowerOff);
    let tail = sb.console_tail().await.unwrap();
    assert!(tail.contains("bare-metal guest: start"), "{tail}");
    match sb.exec("true", Vec::<String>::new()).await {
        Err(ExecError::VmStopped { reason: StopReason::GuestPowerOff, .. }) => {}
        other => panic!("exec on a stopped VM: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reset_is_reported_as_reboot() {
    let (sb, _dir) = create("reset", Variant::happy(RESET)).await;
    let sb = sb.expect("handshake");
    assert_eq!(sb.wait().await.unwrap(), StopReason::GuestReboot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_outside_guest_memory_fails_the_device() {
    let v = Variant { desc_addr: "$0xf0000000".into(), ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("badaddr", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("0xf0000000"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indirect_descriptor_that_was_never_offered_fails_the_device() {
    let v = Variant { desc_flags: 4, ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("indirect", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("indirect"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misaligned_descriptor_table_fails_the_device_at_the_write() {
    let v = Variant { desc_table: 0x300008, ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("misaligned", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("not 16-byte aligned"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_arming_a_queue_after_driver_ok_fails_the_device() {
    // After the handshake the guest unreadies its transmit queue, to point it elsewhere.
    // The write can land before or after the host finished the handshake: either way the
    // device fails and the VM stops with that reason.
    let (sb, _dir) = create("rearm", Variant::happy("movl $0, 0x44(%ebx)")).await;
    let reason = match sb {
        Ok(sb) => sb.wait().await.unwrap(),
        Err(e) => stop_reason(Err(e)).0,
    };
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("after DRIVER_OK"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_the_channel() {
    let v = Variant { payload: vec![0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0], ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("oversized", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("exceeds"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_loop_is_bounded_and_fails_closed() {
    // Descriptor 0 chains to itself: the chain walk stops after one queue's worth of
    // descriptors, so the host sees 8 copies of the Ready frame, and the second is a
    // protocol violation.
    let v = Variant { desc_flags: 1, ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("loop", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("Ready twice"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_queue_size_fails_the_device() {
    let v = Variant { queue_size: 3, ..Variant::happy(IDLE) };
    let (reason, _) = stop_reason(create("qsize", v).await.0);
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("size 3"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_zero_length_descriptors_is_paid_for_and_the_real_frame_still_arrives() {
    // Descriptors 0..=254 form one chain of zero-length buffers; descriptor 255 holds the
    // Ready frame. The available ring names the empty chain 255 times, then the frame: one
    // notification asks for ~65,000 descriptor visits. The host serves it in bounded rounds
    // that continue by themselves (the guest never notifies again), so the frame arrives.
    let len = ready_frame().len();
    let extra = format!(
        r#"
    mov $0, %ecx
3:  mov %ecx, %eax
    shl $4, %eax
    movl $payload, DESC(%eax)
    movl $0, DESC+4(%eax)
    movl $0, DESC+8(%eax)
    movw $1, DESC+12(%eax)
    lea 1(%ecx), %edx
    movw %dx, DESC+14(%eax)
    inc %ecx
    cmp $255, %ecx
    jne 3b
    movw $0, DESC+12+254*16
    movl $payload, DESC+255*16
    movl $0, DESC+255*16+4
    movl ${len}, DESC+255*16+8
    movw $0, DESC+255*16+12
    mov $0, %ecx
4:  movw $0, AVAIL+4(,%ecx,2)
    inc %ecx
    cmp $255, %ecx
    jne 4b
    movw $255, AVAIL+4+255*2
    movw $256, AVAIL+2
"#
    );
    let v = Variant { queue_size: 256, extra, ..Variant::happy(IDLE) };
    let (sb, _dir) = create("storm", v).await;
    let sb = sb.expect("the Ready frame behind the storm reaches the host");
    sb.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_with_host_bytes_in_flight_fails_the_device_instead_of_stranding_them() {
    // The guest never posts a receive buffer, so the host's Hello waits in the device; a
    // moment later the guest resets the device. Dropping the Hello would strand the host's
    // send credit; the device fails instead and the VM stops with the reason.
    const FINISH: &str = "mov $1000000, %ecx\n5: dec %ecx\n jnz 5b\n movl $0, 0x70(%ebx)";
    let (sb, _dir) = create("reset-in-flight", Variant::happy(FINISH)).await;
    let reason = match sb {
        Ok(sb) => tokio::time::timeout(Duration::from_secs(30), sb.wait()).await.expect("the VM stops").unwrap(),
        Err(e) => stop_reason(Err(e)).0,
    };
    match reason {
        StopReason::DeviceFailure(why) => assert!(why.contains("undelivered"), "{why}"),
        other => panic!("{other:?}"),
    }
}
