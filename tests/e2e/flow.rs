//! Flow control and deadlines against a real guest: a session whose consumer is slow or gone
//! stalls only itself, stdin is taken only as fast as the command reads it, and a timeout is
//! the host's to enforce. Each scenario checks that the sandbox keeps answering other
//! sessions and that what this process holds outside guest RAM stays bounded.

use std::time::{Duration, Instant};

use msb_actors::{ExecError, ExecEvent, ExecSpec, ExitStatus, Sandbox};
use msb_tests::boot;

use crate::sh;

/// Growth of host memory outside guest RAM a scenario may cause: never the size of what the
/// guest or the client offered (GiBs). The scenario itself needs a few windows (~1 MiB); the
/// bound leaves room for another test running in this process at the same time (on hardware
/// KVM the suite runs two at once, and one of them holds 10 MiB buffers several times over).
const RSS_BOUND_KIB: u64 = 128 * 1024;

async fn outside_guest_kib(sb: &Sandbox) -> u64 {
    sb.boot_times().await.unwrap().memory.expect("resident memory is measured").outside_guest_kib()
}

/// Other sessions are served promptly: `n` round trips, each well inside `within`.
async fn answers(sb: &Sandbox, n: usize, within: Duration) {
    for i in 0..n {
        let t = Instant::now();
        let out = tokio::time::timeout(within, sb.exec("echo", [format!("alive{i}")]))
            .await
            .unwrap_or_else(|_| panic!("round trip {i} took longer than {within:?} beside a stalled session"))
            .unwrap();
        assert_eq!(out.stdout, format!("alive{i}\n").as_bytes());
        assert!(t.elapsed() < within);
    }
}

/// Starts `cat /dev/zero` and reads one chunk of it, then nothing: a stalled flood.
async fn stalled_flood(sb: &Sandbox) -> msb_actors::ExecHandle {
    let mut h = sb.exec_stream(ExecSpec::command(["cat", "/dev/zero"])).await.unwrap();
    zeros(h.next().await);
    h
}

/// Asserts that `ev` is a chunk of zeros from stdout, and says what it was otherwise.
fn zeros(ev: Option<ExecEvent>) {
    match ev {
        Some(ExecEvent::Stdout(d)) if !d.is_empty() && d.iter().all(|b| *b == 0) => {}
        Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => {
            panic!("expected zeros on stdout, got {:?}", String::from_utf8_lossy(&d[..d.len().min(200)]))
        }
        other => panic!("expected zeros on stdout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_of_a_flood_stalls_only_itself() {
    msb_tests::rig_flood(
        "a_stalled_reader_of_a_flood_stalls_only_itself",
        a_stalled_reader_of_a_flood_stalls_only_itself_scenario,
    )
    .await;
}

async fn a_stalled_reader_of_a_flood_stalls_only_itself_scenario() {
    let sb = boot().await;
    let before = outside_guest_kib(&sb).await;
    // A command that floods, and a consumer that reads one chunk and then nothing.
    let mut flood = stalled_flood(&sb).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    answers(&sb, 20, Duration::from_secs(10)).await;
    let grown = outside_guest_kib(&sb).await.saturating_sub(before);
    assert!(grown < RSS_BOUND_KIB, "a stalled reader made the host hold {grown} KiB");
    // Reading resumes where it stopped.
    for _ in 0..50 {
        zeros(flood.next().await);
    }
    // Letting go of the handle returns its credit: the command runs on, its output dropped,
    // and the sandbox still answers.
    drop(flood);
    answers(&sb, 5, Duration::from_secs(10)).await;
    let grown = outside_guest_kib(&sb).await.saturating_sub(before);
    assert!(grown < RSS_BOUND_KIB, "after letting go the host holds {grown} KiB more");
    sb.exec_argv(sh("pkill cat || killall cat || true"), vec![], None).await.unwrap();
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_that_is_never_read_is_not_taken() {
    msb_tests::rig_flood("stdin_that_is_never_read_is_not_taken", stdin_that_is_never_read_is_not_taken_scenario).await;
}

async fn stdin_that_is_never_read_is_not_taken_scenario() {
    let sb = boot().await;
    let before = outside_guest_kib(&sb).await;
    let h = sb.exec_stream(ExecSpec::command(["sleep", "600"])).await.unwrap();
    let control = h.control();
    // Offer 4 GiB in 64 KiB writes; count what the sandbox accepts in 5 s.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(4u64 << 30) / chunk.len() as u64 {
            if control.write_stdin(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let taken = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // The protocol's stdin window plus the guest pipe's own buffer, nothing more.
    assert!(taken <= 1 << 20, "{taken} bytes of stdin accepted for a command that reads none");
    answers(&sb, 10, Duration::from_secs(10)).await;
    let grown = outside_guest_kib(&sb).await.saturating_sub(before);
    assert!(grown < RSS_BOUND_KIB, "an unread stdin flood made the host hold {grown} KiB");
    h.signal(9).await.unwrap();
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));
    // The writer learns the command is gone.
    tokio::time::timeout(Duration::from_secs(10), writer).await.expect("the stdin writer is answered").unwrap();
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_what_escaped_the_process_group_and_answers_in_time() {
    msb_tests::rig_flood(
        "a_timeout_kills_what_escaped_the_process_group_and_answers_in_time",
        a_timeout_kills_what_escaped_the_process_group_and_answers_in_time_scenario,
    )
    .await;
}

async fn a_timeout_kills_what_escaped_the_process_group_and_answers_in_time_scenario() {
    let sb = boot().await;
    let spec = ExecSpec {
        argv: sh("setsid sleep 600 & sleep 600"),
        user: Some("msb".into()),
        timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let t = Instant::now();
    match sb.exec_spec(spec).await {
        Err(ExecError::TimedOut { after }) => assert_eq!(after, Duration::from_secs(3)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = t.elapsed();
    assert!(took <= Duration::from_secs(5), "the timeout answered after {took:?}");
    // Everything the exec started is gone, the escaped `setsid` child included.
    let mut left = String::new();
    for _ in 0..20 {
        let ps = sb.exec_argv(sh("ps -o args | grep '[s]leep 600' || true"), vec![], None).await.unwrap();
        left = String::from_utf8_lossy(&ps.stdout).into_owned();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(left, "", "processes of a timed-out exec survived");
    // A streaming exec gets the same end.
    let spec = ExecSpec { timeout: Some(Duration::from_secs(2)), ..ExecSpec::command(["sleep", "600"]) };
    let h = sb.exec_stream(spec).await.unwrap();
    assert!(matches!(h.wait().await, Err(ExecError::TimedOut { .. })));
    answers(&sb, 3, Duration::from_secs(10)).await;
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_sessions_with_one_stalled() {
    msb_tests::rig_flood("sixty_four_sessions_with_one_stalled", sixty_four_sessions_with_one_stalled_scenario).await;
}

async fn sixty_four_sessions_with_one_stalled_scenario() {
    let sb = boot().await;
    let before = outside_guest_kib(&sb).await;
    let stalled = stalled_flood(&sb).await;
    let runs = (0..63).map(|i| {
        let sb = &sb;
        async move {
            let out = sb.exec_argv(sh(&format!("echo s{i}; head -c 100000 /dev/zero | wc -c")), vec![], None).await;
            (i, out)
        }
    });
    let outs = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(runs))
        .await
        .expect("63 sessions finish beside a stalled one");
    for (i, out) in outs {
        let out = out.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("s{i}\n100000\n"));
    }
    let grown = outside_guest_kib(&sb).await.saturating_sub(before);
    assert!(grown < RSS_BOUND_KIB, "64 sessions made the host hold {grown} KiB");
    stalled.signal(9).await.unwrap();
    sb.stop().await.unwrap();
}

/// The scenario behind issue 8's unexplained triple fault, held for four minutes: a flood
/// nobody reads any more (released, so acknowledged and dropped as it arrives) and a flood
/// whose reader stalled, beside round trips. In the rig it triple-faulted the guest once in
/// four runs (see the README); it is here to be run where `/dev/kvm` is hardware, which
/// tells the rig's nested SVM apart from the VMM. Ignored by default (it takes minutes): run
/// `msb-e2e --ignored soak`, or `RIG_E2E_ARGS="--ignored soak" tests/rig/run-rig.sh e2e`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak_a_released_and_a_stalled_flood_for_four_minutes() {
    let sb = boot().await;
    // MSB_SOAK=released|stalled|read narrows it down (default: released and stalled).
    let mode = std::env::var("MSB_SOAK").unwrap_or_default();
    let secs = std::env::var("MSB_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(240);
    if mode.is_empty() || mode == "released" {
        let released = sb.exec_stream(ExecSpec::command(["cat", "/dev/zero"])).await.unwrap();
        drop(released);
    }
    let stalled = stalled_flood(&sb).await;
    if mode == "read" {
        // A flood that is read as fast as it comes, on its own task.
        let mut h = sb.exec_stream(ExecSpec::command(["cat", "/dev/zero"])).await.unwrap();
        tokio::spawn(async move { while h.next().await.is_some() {} });
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut worst = Duration::ZERO;
    while Instant::now() < end {
        let t = Instant::now();
        answers(&sb, 1, Duration::from_secs(20)).await;
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!("soak: worst round trip beside two floods over 4 minutes: {worst:?}");
    stalled.signal(9).await.unwrap();
    sb.exec_argv(sh("pkill cat || true"), vec![], None).await.unwrap();
    assert_eq!(sb.stop().await.unwrap(), msb_actors::StopReason::Shutdown);
}
