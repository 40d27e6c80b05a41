//! End-to-end suite: real Linux guests booted by our VMM. Runs in the rig (nested TCG) and,
//! unchanged, directly on hardware KVM. Every test fails, never skips, where it cannot boot.

mod cli;
mod flow;
mod harden;
mod images;
mod mounts;
mod net;
mod secrets;

use std::time::Duration;

use msb_actors::{ExecError, ExecEvent, ExecSpec, ExitStatus, SpawnErrorKind, StopReason};
use msb_tests::boot;

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_echo_hi_and_orderly_stop() {
    let sb = boot().await;
    let out = sb.exec("echo", ["hi"]).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"");
    assert_eq!(out.status, ExitStatus::Code(0));
    let uname = sb.exec("uname", ["-sr"]).await.unwrap();
    assert!(String::from_utf8_lossy(&uname.stdout).starts_with("Linux 6.1"), "{uname:?}");
    let t = sb.boot_times().await.unwrap();
    assert!(t.to_init.is_some(), "the guest init wrote the boot timer");
    assert_eq!(sb.stop().await.unwrap(), StopReason::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_stderr_env_cwd_and_large_output() {
    let sb = boot().await;
    for code in [0, 1, 42] {
        let out = sb.exec_argv(sh(&format!("exit {code}")), vec![], None).await.unwrap();
        assert_eq!(out.status, ExitStatus::Code(code));
    }
    // A missing command inside a shell is the shell's 127 ...
    let out = sb.exec_argv(sh("no-such-command-xyz"), vec![], None).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"), "{out:?}");
    // ... and a missing program run directly is a spawn failure, kept apart from "ran and failed".
    match sb.exec("no-such-program-xyz", Vec::<String>::new()).await {
        Err(ExecError::SpawnFailed { kind: SpawnErrorKind::NotFound, .. }) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
    match sb.exec_argv(vec!["pwd".into()], vec![], Some("/no/such/dir".into())).await {
        Err(ExecError::SpawnFailed { kind: SpawnErrorKind::BadCwd, .. }) => {}
        other => panic!("expected BadCwd, got {other:?}"),
    }
    let killed = sb.exec_argv(sh("kill -9 $$"), vec![], None).await.unwrap();
    assert_eq!(killed.status, ExitStatus::Signal(9));

    let out = sb.exec_argv(sh("echo to-out; echo to-err >&2; exit 3"), vec![], None).await.unwrap();
    assert_eq!(out.stdout, b"to-out\n");
    assert_eq!(out.stderr, b"to-err\n");
    assert_eq!(out.status, ExitStatus::Code(3));

    let out = sb
        .exec_argv(sh("echo $GREETING; pwd"), vec![("GREETING".into(), "hello there".into())], Some("/tmp".into()))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello there\n/tmp\n");

    // More than 1 MiB of output arrives intact and in order.
    let out = sb.exec("seq", ["1", "170000"]).await.unwrap();
    let expected: String = (1..=170000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 1 << 20);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes(), "1 MiB output corrupted");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sandboxes_never_see_each_other() {
    let (a, b) = tokio::join!(boot(), boot());
    a.exec_argv(sh("echo secret-a > /tmp/mine"), vec![], None).await.unwrap();
    async fn run(sb: &msb_actors::Sandbox, tag: &str) -> String {
        let mut all = Vec::new();
        for i in 0..5 {
            let out =
                sb.exec_argv(sh(&format!("echo {tag}-{i}; cat /tmp/mine 2>/dev/null")), vec![], None).await.unwrap();
            all.extend(out.stdout);
        }
        String::from_utf8(all).unwrap()
    }
    let (out_a, out_b) = tokio::join!(run(&a, "aaa"), run(&b, "bbb"));
    assert!(!out_a.contains("bbb"), "{out_a}");
    assert!(!out_b.contains("aaa"), "{out_b}");
    assert!(out_a.contains("secret-a"));
    assert!(!out_b.contains("secret-a"), "sandbox b saw a's file: {out_b}");
    assert_eq!(out_a.matches("aaa-").count(), 5);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_is_reported() {
    let sb = boot().await;
    let pending = sb.exec("poweroff", ["-f"]);
    let r = tokio::time::timeout(Duration::from_secs(60), pending).await.expect("exec ends when the VM stops");
    match r {
        Err(ExecError::VmStopped { reason: StopReason::GuestPowerOff, .. }) => {}
        other => panic!("expected the VM to stop with GuestPowerOff, got {other:?}"),
    }
    assert_eq!(sb.wait().await.unwrap(), StopReason::GuestPowerOff);
    assert!(matches!(sb.exec("true", Vec::<String>::new()).await, Err(ExecError::VmStopped { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_panic_is_reported() {
    let sb = boot().await;
    let r =
        tokio::time::timeout(Duration::from_secs(60), sb.exec_argv(sh("echo c > /proc/sysrq-trigger"), vec![], None))
            .await
            .expect("exec ends when the VM stops");
    match r {
        Err(ExecError::VmStopped { reason: StopReason::GuestPanic, console_tail }) => {
            assert!(console_tail.contains("Kernel panic"), "{console_tail}");
        }
        other => panic!("expected GuestPanic, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vcpus_come_up() {
    let sb = msb_tests::boot_with(|| msb_actors::Sandbox::builder().memory_mib(256).cpus(2)).await;
    let out = sb.exec("nproc", Vec::<String>::new()).await.unwrap();
    assert_eq!(out.stdout, b"2\n", "{out:?}");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_gets_ready_times_out_with_its_console() {
    msb_tests::require_linux_capable_kvm();
    // init is `sleep`, not agentd: the kernel boots, nothing ever answers.
    let r = msb_actors::Sandbox::builder()
        .kernel_args("loglevel=7 rdinit=/bin/sleep -- 600")
        .boot_timeout(Duration::from_secs(20))
        .create()
        .await;
    match r {
        Err(msb_actors::Error::BootTimeout { secs: 20, console_tail }) => {
            assert!(console_tail.contains("Run /bin/sleep as init process"), "{console_tail}")
        }
        Err(e) => panic!("expected a boot timeout, got {e}"),
        Ok(_) => panic!("expected a boot timeout, but the sandbox became ready"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bzimage_boots_through_the_fallback_protocol() {
    // scripts/setup.sh builds the rig's kernel as a bzImage from the same sources; as a guest
    // it exercises the 64-bit Linux boot protocol path instead of PVH.
    let bz = msb_images::msb_home().unwrap().join("rig/bzImage");
    assert!(bz.is_file(), "{} missing: run scripts/setup.sh", bz.display());
    let sb = msb_tests::boot_with(|| msb_actors::Sandbox::builder().kernel(bz.clone())).await;
    let out = sb.exec("cat", ["/proc/cmdline"]).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("virtio_mmio.device="), "{out:?}");
    assert_eq!(sb.stop().await.unwrap(), StopReason::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_timeout_and_user() {
    let sb = boot().await;
    // 10 MiB of stdin through `cat`, back byte for byte (flow control on both directions).
    let mut x: u32 = 12345;
    let input: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let spec = ExecSpec { argv: vec!["cat".into()], stdin: Some(input.clone()), ..Default::default() };
    let out = sb.exec_spec(spec).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "10 MiB stdin round trip corrupted");

    // A command past its timeout is killed, reported as a timeout, and the sandbox lives on.
    let spec =
        ExecSpec { argv: sh("sleep 600; echo never"), timeout: Some(Duration::from_secs(2)), ..Default::default() };
    match sb.exec_spec(spec).await {
        Err(ExecError::TimedOut { after }) => assert_eq!(after, Duration::from_secs(2)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(sb.exec("echo", ["alive"]).await.unwrap().stdout, b"alive\n");

    // Dropping root.
    let spec = ExecSpec { argv: sh("id -u; id -g"), user: Some("1000:1001".into()), ..Default::default() };
    assert_eq!(sb.exec_spec(spec).await.unwrap().stdout, b"1000\n1001\n");
    // The working directory is entered as the user: one only root can reach is refused.
    sb.exec_argv(sh("mkdir -p /secret/pub && chmod 700 /secret"), vec![], None).await.unwrap();
    let spec = ExecSpec {
        argv: vec!["pwd".into()],
        user: Some("msb".into()),
        cwd: Some("/secret/pub".into()),
        ..Default::default()
    };
    let out = sb.exec_spec(spec).await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(126), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("working directory /secret/pub"), "{out:?}");
    let spec =
        ExecSpec { argv: vec!["pwd".into()], user: Some("msb".into()), cwd: Some("/tmp".into()), ..Default::default() };
    assert_eq!(sb.exec_spec(spec).await.unwrap().stdout, b"/tmp\n");
    // Names come from the guest's /etc/passwd and /etc/group.
    let spec = ExecSpec { argv: sh("id -u; id -g"), user: Some("nobody".into()), ..Default::default() };
    assert_eq!(sb.exec_spec(spec).await.unwrap().stdout, b"65534\n65534\n");
    let spec = ExecSpec { argv: sh("id -u; id -g"), user: Some("msb:users".into()), ..Default::default() };
    assert_eq!(sb.exec_spec(spec).await.unwrap().stdout, b"1000\n100\n");
    match sb.exec_spec(ExecSpec { argv: vec!["id".into()], user: Some("Bad User".into()), ..Default::default() }).await
    {
        Err(ExecError::Invalid(msg)) => assert!(msg.contains("UID[:GID]"), "{msg}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    match sb.exec_spec(ExecSpec { argv: vec!["id".into()], user: Some("ghost".into()), ..Default::default() }).await {
        Err(ExecError::SpawnFailed { kind: SpawnErrorKind::InvalidRequest, message }) => {
            assert!(message.contains("/etc/passwd"), "{message}")
        }
        other => panic!("expected an unknown-user failure, got {other:?}"),
    }
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sequential_and_concurrent_execs_and_orphans_are_reaped() {
    let sb = boot().await;
    for i in 0..100 {
        let out = sb.exec("echo", [i.to_string()]).await.unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
    }
    let runs = (0..10).map(|i| {
        let sb = &sb;
        async move { sb.exec_argv(sh(&format!("sleep 1; echo c{i}")), vec![], None).await.unwrap() }
    });
    let outs = futures::future::join_all(runs).await;
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.stdout, format!("c{i}\n").as_bytes());
    }
    // An orphaned grandchild is adopted and reaped by agentd (PID 1): no zombie remains.
    sb.exec_argv(sh("(sleep 1 &) ; true"), vec![], None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ps = sb.exec_argv(sh("grep -l '^State:.*Z' /proc/[0-9]*/status || true"), vec![], None).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&ps.stdout), "", "zombies left behind");
    sb.stop().await.unwrap();
}

async fn read_until(h: &mut msb_actors::ExecHandle, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.windows(want.len()).any(|w| w == want) {
        match h.next().await {
            Some(ExecEvent::Stdout(d)) => got.extend(d),
            other => panic!("waiting for {:?}, got {other:?} after {:?}", String::from_utf8_lossy(want), got),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_exec_with_stdin_and_signals() {
    let sb = boot().await;
    // Output arrives while the command runs, not only at its end.
    let mut h = sb.exec_stream(ExecSpec { argv: sh("echo a; sleep 2; echo b"), ..Default::default() }).await.unwrap();
    assert!(matches!(h.next().await, Some(ExecEvent::Stdout(d)) if d == b"a\n"));
    let rest = h.wait().await.unwrap();
    assert_eq!(rest.stdout, b"b\n");

    // Interactive stdin: each line comes back before the next is written.
    let mut h = sb.exec_stream(ExecSpec { argv: vec!["cat".into()], ..Default::default() }).await.unwrap();
    h.write_stdin(b"first\n").await.unwrap();
    read_until(&mut h, b"first\n").await;
    h.write_stdin(b"second\n").await.unwrap();
    read_until(&mut h, b"second\n").await;
    h.close_stdin().await.unwrap();
    assert!(matches!(h.next().await, Some(ExecEvent::Exited(ExitStatus::Code(0)))));
    // Writing after the command ended is a broken pipe.
    assert!(matches!(h.write_stdin(b"late").await, Err(ExecError::StdinClosed)));

    // Signals reach the command's process group.
    let script = "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done";
    let mut h = sb.exec_stream(ExecSpec { argv: sh(script), ..Default::default() }).await.unwrap();
    read_until(&mut h, b"ready\n").await;
    h.signal(15).await.unwrap();
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("got-term"), "{out:?}");
    sb.stop().await.unwrap();
}
