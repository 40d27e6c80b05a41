//! `msb logs`: the guest console and exec output of a sandbox, merged by time.
//!
//! Both files hold lines that start with an RFC 3339 UTC timestamp (fixed width), so a
//! stable merge on the timestamp text orders them. Console lines get a `[console]` tag.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use msb_control_plane::NamedSandbox;

use crate::report::for_terminal;

/// One log line, tagged.
fn tag_console(line: &str) -> String {
    match line.split_once(' ') {
        Some((ts, rest)) => format!("{ts} [console] {rest}"),
        None => format!("[console] {line}"),
    }
}

/// The complete lines of a file, and the offset just past them (where following resumes, so
/// no line is lost or printed twice).
fn read_lines(p: &Path) -> (Vec<String>, u64) {
    let bytes = std::fs::read(p).unwrap_or_default();
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..complete]);
    (text.lines().map(String::from).collect(), complete as u64)
}

/// Merges console and exec lines by timestamp (stable: equal stamps keep file order).
pub fn merged(console: &[String], exec: &[String]) -> Vec<String> {
    let mut all: Vec<(String, u8, usize, String)> = Vec::new();
    for (i, l) in console.iter().enumerate() {
        let t = tag_console(l);
        all.push((stamp(&t), 0, i, t));
    }
    for (i, l) in exec.iter().enumerate() {
        all.push((stamp(l), 1, i, l.clone()));
    }
    all.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    all.into_iter().map(|(.., l)| l).collect()
}

fn stamp(line: &str) -> String {
    line.split(' ').next().unwrap_or("").to_string()
}

struct Follow {
    path: PathBuf,
    offset: u64,
    partial: String,
    console: bool,
}

impl Follow {
    fn new(path: PathBuf, offset: u64, console: bool) -> Self {
        Follow { path, offset, partial: String::new(), console }
    }

    /// New complete lines since the last call.
    fn poll(&mut self) -> Vec<String> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return Vec::new() };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            self.offset = 0; // a new run truncated the console log
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end_matches('\n');
            out.push(if self.console { tag_console(line) } else { line.to_string() });
        }
        out
    }
}

pub async fn logs(sb: &NamedSandbox, follow: bool, tail: Option<usize>) -> msb_control_plane::Result<()> {
    sb.record()?;
    let (console, exec) = (sb.dir().join("console.log"), sb.dir().join("exec.log"));
    let ((console_lines, console_at), (exec_lines, exec_at)) = (read_lines(&console), read_lines(&exec));
    let mut lines = merged(&console_lines, &exec_lines);
    if let Some(n) = tail {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    let files = vec![Follow::new(console, console_at, true), Follow::new(exec, exec_at, false)];
    show(sb, lines, follow.then_some(files)).await
}

/// `msb logs --net`: the network audit stream, one JSON line per gateway decision.
pub async fn net_logs(sb: &NamedSandbox, follow: bool, tail: Option<usize>) -> msb_control_plane::Result<()> {
    sb.record()?;
    let path = sb.dir().join("net.jsonl");
    let (mut lines, at) = read_lines(&path);
    if let Some(n) = tail {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    show(sb, lines, follow.then(|| vec![Follow::new(path, at, false)])).await
}

/// Prints `lines`, then, when following, new lines of `files` until the sandbox stops.
async fn show(sb: &NamedSandbox, lines: Vec<String>, follow: Option<Vec<Follow>>) -> msb_control_plane::Result<()> {
    let mut out = std::io::stdout();
    for l in &lines {
        let _ = writeln!(out, "{}", for_terminal(l));
    }
    let _ = out.flush();
    let Some(mut files) = follow else { return Ok(()) };
    let mut ticks = 0u32;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut new: Vec<String> = files.iter_mut().flat_map(|f| f.poll()).collect();
        new.sort_by_key(|l| stamp(l));
        for l in new {
            let _ = writeln!(out, "{}", for_terminal(&l));
        }
        let _ = out.flush();
        ticks += 1;
        if ticks.is_multiple_of(5) && !sb.record().map(|r| r.status.is_live()).unwrap_or(false) {
            // One last read after the sandbox stopped, then done.
            for l in files.iter_mut().flat_map(|f| f.poll()) {
                let _ = writeln!(out, "{}", for_terminal(&l));
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_and_exec_lines_merge_by_time() {
        let console = vec!["2026-01-01T00:00:01.000Z boot".to_string(), "2026-01-01T00:00:03.000Z late".to_string()];
        let exec = vec!["2026-01-01T00:00:02.000Z [exec 1 stdout] hi".to_string()];
        assert_eq!(
            merged(&console, &exec),
            vec![
                "2026-01-01T00:00:01.000Z [console] boot",
                "2026-01-01T00:00:02.000Z [exec 1 stdout] hi",
                "2026-01-01T00:00:03.000Z [console] late",
            ]
        );
    }
}
