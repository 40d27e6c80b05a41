//! The state store: one SQLite database (`$MSB_HOME/state.db`) that records every named
//! sandbox (its configuration, status, the pid of its sandbox process) and the history of its
//! runs.
//!
//! Invariants:
//! - every read-modify-write is one `IMMEDIATE` transaction, so concurrent `msb` processes
//!   serialise on the database lock (WAL journal, 10 s busy timeout) and never see or leave a
//!   half-applied change;
//! - a sandbox is `running` or `starting` only while the process recorded for it is alive:
//!   [`Store::reconcile`] (run at the start of every command) marks sandboxes whose process
//!   died without saying so (SIGKILL, OOM, host crash) as `crashed` and closes their run;
//! - a process is identified by pid *and* start time, so a recycled pid is never mistaken
//!   for the sandbox process.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use msb_schema::SandboxName;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

pub use crate::process::ProcessId;
use crate::wire::SandboxConfig;

/// How long a sandbox may be `starting` without a sandbox process before it counts as crashed
/// (its client spawns the process right after claiming the start).
pub const STARTING_GRACE: Duration = Duration::from_secs(60);

/// How a sandbox process's exit report begins when a seccomp filter killed it (the same
/// words its reporter writes, `msb_hypervisor::sigsys`).
pub const VIOLATION_PREFIX: &str = "seccomp violation: ";

/// What a client tried to do with a sandbox whose status does not allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Remove,
    /// Reach its sandbox process (exec, info, release).
    Connect,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Start => "started",
            Action::Remove => "removed",
            Action::Connect => "reached",
        })
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a sandbox named {0:?} already exists")]
    Exists(String),
    #[error("no sandbox named {0:?}")]
    NotFound(String),
    #[error("sandbox {name:?} is {status}, so it cannot be {action}")]
    WrongStatus { name: String, status: Status, action: Action },
    #[error(transparent)]
    InvalidName(#[from] msb_schema::NameError),
    /// The home directory is missing, not ours alone, or unreadable.
    #[error(transparent)]
    Home(#[from] msb_images::Error),
    #[error("state database {path}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database holds an unreadable record for {0:?}: {1}")]
    Corrupt(String, String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded, never started.
    Created,
    /// A client is starting its sandbox process.
    Starting,
    Running,
    Stopped,
    /// Its sandbox process died without recording why.
    Crashed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Status::Created, Status::Starting, Status::Running, Status::Stopped, Status::Crashed]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
    /// Whether the sandbox process is (supposed to be) alive.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Starting | Status::Running)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One sandbox as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub config: SandboxConfig,
    pub status: Status,
    pub process: Option<ProcessId>,
    /// Removed when its run ends (`msb run` without `--name`).
    pub ephemeral: bool,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub last_run: Option<Run>,
}

/// One start-to-stop run of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: i64,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub exit_reason: Option<String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Formats milliseconds since the epoch as RFC 3339 (UTC, seconds).
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('created', 'starting', 'running', 'stopped', 'crashed')),
    pid INTEGER,
    pid_start INTEGER,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    run_id INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox TEXT NOT NULL REFERENCES sandboxes(name) ON DELETE CASCADE,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    exit_reason TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_sandbox ON runs(sandbox);
CREATE TABLE IF NOT EXISTS images (
    reference TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    manifest TEXT,
    layers INTEGER NOT NULL,
    size INTEGER NOT NULL,
    loaded_ms INTEGER NOT NULL
);
";

/// An image as the state store lists it: a mirror of the image store's names
/// ([`Store::sync_images`]). The image store's own records stay the truth (each is
/// published only after its root filesystem is built); this table is what queries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub reference: String,
    /// The config digest.
    pub id: String,
    pub manifest: Option<String>,
    pub layers: u32,
    pub size: u64,
    pub loaded_ms: u64,
}

/// An open state database.
pub struct Store {
    conn: Connection,
    path: String,
}

impl Store {
    /// Opens (creating if needed) `$home/state.db`, after checking that `home` is this
    /// user's alone ([`msb_images::ensure_private`]).
    pub fn open(home: &Path) -> Result<Self> {
        let path = home.join("state.db");
        let shown = path.display().to_string();
        let db = |source| StoreError::Db { path: shown.clone(), source };
        msb_images::ensure_private(home)?;
        let conn = Connection::open(&path).map_err(db)?;
        // Sandbox configurations are the user's business only (SQLite gives its -wal and -shm
        // files the database's mode).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        // journal_mode returns a row; WAL lets readers run beside one writer.
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())).map_err(db)?;
        conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;").map_err(db)?;
        let store = Store { conn, path: shown };
        store.write(|tx| tx.execute_batch(SCHEMA))?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }

    /// Runs `f` in one IMMEDIATE transaction (takes the write lock up front, so two
    /// processes can never both read a state and then both act on it).
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>) -> Result<T> {
        self.write_checked(|tx| Ok(f(tx)))?.map_err(|e| self.err(e))
    }

    fn write_checked<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        // `Connection` is not shared between threads here; an unchecked transaction on a
        // shared reference is the documented way to start one without `&mut`.
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let out = f(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Records a new sandbox (status `created`). Fails if the name is taken or invalid.
    pub fn insert(&self, name: &SandboxName, config: &SandboxConfig, ephemeral: bool) -> Result<()> {
        let config = serde_json::to_string(config).map_err(|e| StoreError::Corrupt(name.to_string(), e.to_string()))?;
        let name = name.as_str();
        let now = now_ms() as i64;
        self.write_checked(|tx| {
            let r = tx.execute(
                "INSERT INTO sandboxes (name, config, status, ephemeral, created_ms, updated_ms)
                 VALUES (?1, ?2, 'created', ?3, ?4, ?4)",
                params![name, config, ephemeral, now],
            );
            match r {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    Err(StoreError::Exists(name.to_string()))
                }
                Err(e) => Err(self.err(e)),
            }
        })
    }

    fn read_record(tx: &Connection, name: &str) -> rusqlite::Result<Option<RawRecord>> {
        tx.query_row(
            "SELECT s.name, s.config, s.status, s.pid, s.pid_start, s.ephemeral, s.created_ms,
                    r.id, r.started_ms, r.ended_ms, r.exit_reason
             FROM sandboxes s LEFT JOIN runs r ON r.id = s.run_id WHERE s.name = ?1",
            [name],
            RawRecord::from_row,
        )
        .optional()
    }

    /// One sandbox.
    pub fn get(&self, name: &str) -> Result<Record> {
        Self::read_record(&self.conn, name)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?
            .parse()
    }

    /// Every sandbox, by name.
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT s.name, s.config, s.status, s.pid, s.pid_start, s.ephemeral, s.created_ms,
                        r.id, r.started_ms, r.ended_ms, r.exit_reason
                 FROM sandboxes s LEFT JOIN runs r ON r.id = s.run_id ORDER BY s.name",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], RawRecord::from_row).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        // One unreadable row must not make every command fail: it is skipped (and said so);
        // `get` of that name still reports it, and `remove` deletes it.
        for r in rows {
            match r.map_err(|e| self.err(e)).and_then(RawRecord::parse) {
                Ok(rec) => out.push(rec),
                Err(e) => tracing::warn!("state database: skipping an unreadable sandbox record: {e}"),
            }
        }
        Ok(out)
    }

    /// Whether a sandbox of this name is recorded (readable or not).
    pub fn exists(&self, name: &str) -> Result<bool> {
        self.conn
            .query_row("SELECT 1 FROM sandboxes WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| self.err(e))
    }

    /// Reads `name` inside a write transaction and refuses `action` if it is live.
    fn not_live(&self, tx: &Connection, name: &str, action: Action) -> Result<Record> {
        let rec = Self::read_record(tx, name)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?
            .parse()?;
        if rec.status.is_live() {
            return Err(StoreError::WrongStatus { name: name.to_string(), status: rec.status, action });
        }
        Ok(rec)
    }

    /// Ends the open run of `name` (if any) at `now` with `reason`.
    fn close_run(tx: &Connection, name: &str, now: i64, reason: &str) -> rusqlite::Result<()> {
        tx.execute(
            "UPDATE runs SET ended_ms = ?2, exit_reason = ?3
             WHERE id = (SELECT run_id FROM sandboxes WHERE name = ?1) AND ended_ms IS NULL",
            params![name, now, reason],
        )
        .map(drop)
    }

    /// Takes the right to start `name`: only from `created`, `stopped` or `crashed`, and only
    /// one client at a time (the status becomes `starting`).
    pub fn claim_start(&self, name: &str) -> Result<Record> {
        self.write_checked(|tx| {
            let rec = self.not_live(tx, name, Action::Start)?;
            // The run starts now, so that a start that fails is recorded with its reason.
            let now = now_ms() as i64;
            let run = (|| {
                tx.execute("INSERT INTO runs (sandbox, started_ms) VALUES (?1, ?2)", params![name, now])?;
                let run = tx.last_insert_rowid();
                tx.execute(
                    "UPDATE sandboxes SET status = 'starting', pid = NULL, pid_start = NULL, run_id = ?2,
                     updated_ms = ?3 WHERE name = ?1",
                    params![name, run, now],
                )?;
                Ok(run)
            })()
            .map_err(|e| self.err(e))?;
            tracing::debug!(name, run, "start claimed");
            Ok(rec)
        })
    }

    /// Replaces how a sandbox is built (its next start uses it). A running sandbox's process
    /// keeps what it started with unless it was changed live too.
    pub fn set_config(&self, name: &str, config: &SandboxConfig) -> Result<()> {
        let text = serde_json::to_string(config).map_err(|e| StoreError::Corrupt(name.to_string(), e.to_string()))?;
        let changed = self.write(|tx| {
            tx.execute(
                "UPDATE sandboxes SET config = ?2, updated_ms = ?3 WHERE name = ?1",
                params![name, text, now_ms() as i64],
            )
        })?;
        if changed == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// The sandbox process of a `starting` sandbox exists (recorded by the client that spawned
    /// it, so that a process that dies while booting is detected).
    pub fn set_process(&self, name: &str, p: ProcessId) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE sandboxes SET pid = ?2, pid_start = ?3, updated_ms = ?4 WHERE name = ?1 AND status = 'starting'",
                params![name, p.pid, p.start as i64, now_ms() as i64],
            )
            .map(drop)
        })
    }

    /// The sandbox is up in process `p` (its run began at [`Store::claim_start`]). Returns
    /// the run id.
    pub fn mark_running(&self, name: &str, p: ProcessId) -> Result<i64> {
        let now = now_ms() as i64;
        self.write(|tx| {
            tx.execute(
                "UPDATE sandboxes SET status = 'running', pid = ?2, pid_start = ?3, updated_ms = ?4 WHERE name = ?1",
                params![name, p.pid, p.start as i64, now],
            )?;
            tx.query_row("SELECT run_id FROM sandboxes WHERE name = ?1", [name], |r| r.get(0))
        })
    }

    /// The sandbox that process `p` served stopped: closes its run with `reason`, unless the
    /// record no longer names `p` (another start has taken it over). Returns whether it did.
    pub fn mark_stopped_by(&self, name: &str, p: ProcessId, status: Status, reason: &str) -> Result<bool> {
        let now = now_ms() as i64;
        self.write(|tx| {
            let ours: bool = tx
                .query_row(
                    // A `starting` record without a pid is the start in progress, which is ours
                    // (one start at a time; its client records our pid right after spawning).
                    "SELECT count(*) FROM sandboxes WHERE name = ?1 AND ((pid = ?2 AND pid_start = ?3)
                     OR (pid IS NULL AND status = 'starting'))",
                    params![name, p.pid, p.start as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)?;
            if ours {
                Self::end_run(tx, name, status, now, reason)?;
            }
            Ok(ours)
        })
    }

    /// The sandbox stopped (or never came up): closes its run with `reason`.
    pub fn mark_stopped(&self, name: &str, status: Status, reason: &str) -> Result<()> {
        let now = now_ms() as i64;
        self.write(|tx| Self::end_run(tx, name, status, now, reason))
    }

    /// Closes the open run of `name` with `reason` and leaves the sandbox in `status`, with no
    /// process.
    fn end_run(tx: &Connection, name: &str, status: Status, now: i64, reason: &str) -> rusqlite::Result<()> {
        Self::close_run(tx, name, now, reason)?;
        tx.execute(
            "UPDATE sandboxes SET status = ?2, pid = NULL, pid_start = NULL, updated_ms = ?3 WHERE name = ?1",
            params![name, status.as_str(), now],
        )
        .map(drop)
    }

    /// Deletes a sandbox and its history; refuses while it is live. An unreadable record
    /// (nothing can be known about it, nor done with it) is deleted.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.write_checked(|tx| {
            match self.not_live(tx, name, Action::Remove) {
                Ok(_) | Err(StoreError::Corrupt(..)) => {}
                Err(e) => return Err(e),
            }
            tx.execute("DELETE FROM sandboxes WHERE name = ?1", [name]).map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    /// Makes the `images` table say exactly `images`, in one transaction.
    pub fn sync_images(&self, images: &[ImageRow]) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM images", [])?;
            let mut ins = tx.prepare(
                "INSERT INTO images (reference, id, manifest, layers, size, loaded_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for i in images {
                let size = i64::try_from(i.size).unwrap_or(i64::MAX);
                let loaded = i64::try_from(i.loaded_ms).unwrap_or(i64::MAX);
                ins.execute(rusqlite::params![i.reference, i.id, i.manifest, i.layers, size, loaded])?;
            }
            Ok(())
        })
    }

    /// The images, by reference.
    pub fn images(&self) -> Result<Vec<ImageRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT reference, id, manifest, layers, size, loaded_ms FROM images ORDER BY reference")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ImageRow {
                    reference: r.get(0)?,
                    id: r.get(1)?,
                    manifest: r.get(2)?,
                    layers: r.get(3)?,
                    size: r.get::<_, i64>(4)?.max(0) as u64,
                    loaded_ms: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// The runs of a sandbox, newest first.
    pub fn runs(&self, name: &str) -> Result<Vec<Run>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, started_ms, ended_ms, exit_reason FROM runs WHERE sandbox = ?1 ORDER BY id DESC")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([name], |r| {
                Ok(Run {
                    id: r.get(0)?,
                    started_ms: r.get::<_, i64>(1)? as u64,
                    ended_ms: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    exit_reason: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Marks every live sandbox whose process is gone as crashed; returns their names.
    /// A `starting` sandbox without a recorded process (its client is spawning it) is left
    /// alone for [`STARTING_GRACE`]; after that its client is taken to have died.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        self.reconcile_with(|_, _| None)
    }

    /// [`Store::reconcile`], closing the run of a sandbox whose process is gone with what
    /// `exit_report(name, process)` says about that very process, if anything: a report that
    /// starts with the seccomp violation prefix leaves it `crashed`, any other `stopped`.
    pub fn reconcile_with(&self, exit_report: impl Fn(&str, ProcessId) -> Option<String>) -> Result<Vec<String>> {
        let cutoff = now_ms().saturating_sub(STARTING_GRACE.as_millis() as u64) as i64;
        let mut crashed = self.write(|tx| {
            let names: Vec<String> = tx
                .prepare("SELECT name FROM sandboxes WHERE status = 'starting' AND pid IS NULL AND updated_ms < ?1")?
                .query_map([cutoff], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let now = now_ms() as i64;
            for name in &names {
                Self::close_run(tx, name, now, "the client starting it died before its sandbox process ran (crashed)")?;
                tx.execute(
                    "UPDATE sandboxes SET status = 'crashed', updated_ms = ?2 WHERE name = ?1",
                    params![name, now],
                )?;
            }
            Ok(names)
        })?;
        let live: Vec<Record> = self.list()?.into_iter().filter(|r| r.status.is_live()).collect();
        for rec in live {
            let dead = match rec.process {
                Some(p) => !p.is_alive(),
                None => false,
            };
            if !dead {
                continue;
            }
            let now = now_ms() as i64;
            let p = rec.process.expect("checked");
            let (status, reason) = match exit_report(&rec.name, p) {
                Some(r) if r.starts_with(VIOLATION_PREFIX) => (Status::Crashed, r),
                Some(r) => (Status::Stopped, r),
                None => {
                    (Status::Crashed, format!("sandbox process {} died without stopping the sandbox (crashed)", p.pid))
                }
            };
            // Re-checked inside the transaction: another client may have fixed it already.
            let changed = self.write(|tx| {
                let n = tx.execute(
                    "UPDATE sandboxes SET status = ?5, pid = NULL, pid_start = NULL, updated_ms = ?4
                     WHERE name = ?1 AND pid = ?2 AND pid_start = ?3 AND status IN ('starting', 'running')",
                    params![rec.name, p.pid, p.start as i64, now, status.as_str()],
                )?;
                if n > 0 {
                    Self::close_run(tx, &rec.name, now, &reason)?;
                }
                Ok(n > 0)
            })?;
            if changed {
                crashed.push(rec.name);
            }
        }
        Ok(crashed)
    }
}

struct RawRecord {
    name: String,
    config: String,
    status: String,
    pid: Option<i64>,
    pid_start: Option<i64>,
    ephemeral: bool,
    created_ms: i64,
    run: Option<(i64, i64, Option<i64>, Option<String>)>,
}

impl RawRecord {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let run_id: Option<i64> = r.get(7)?;
        Ok(RawRecord {
            name: r.get(0)?,
            config: r.get(1)?,
            status: r.get(2)?,
            pid: r.get(3)?,
            pid_start: r.get(4)?,
            ephemeral: r.get(5)?,
            created_ms: r.get(6)?,
            run: match run_id {
                Some(id) => Some((id, r.get(8)?, r.get(9)?, r.get(10)?)),
                None => None,
            },
        })
    }

    fn parse(self) -> Result<Record> {
        let corrupt = |why: String| StoreError::Corrupt(self.name.clone(), why);
        let status = Status::parse(&self.status).ok_or_else(|| corrupt(format!("status {:?}", self.status)))?;
        let config: SandboxConfig = serde_json::from_str(&self.config).map_err(|e| corrupt(format!("config: {e}")))?;
        let process = match (self.pid, self.pid_start) {
            (Some(pid), Some(start)) => Some(ProcessId { pid: pid as u32, start: start as u64 }),
            _ => None,
        };
        Ok(Record {
            name: self.name.clone(),
            config,
            status,
            process,
            ephemeral: self.ephemeral,
            created_ms: self.created_ms as u64,
            last_run: self.run.map(|(id, s, e, why)| Run {
                id,
                started_ms: s as u64,
                ended_ms: e.map(|v| v as u64),
                exit_reason: why,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SandboxConfig {
        SandboxConfig { memory_mib: 512, ..Default::default() }
    }

    fn n(name: &str) -> SandboxName {
        SandboxName::new(name).unwrap()
    }

    #[test]
    fn the_images_table_mirrors_what_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let row = |r: &str| ImageRow {
            reference: r.into(),
            id: format!("sha256:{}", "a".repeat(64)),
            manifest: None,
            layers: 3,
            size: u64::MAX,
            loaded_ms: 5,
        };
        s.sync_images(&[row("b:1"), row("a:1")]).unwrap();
        let got = s.images().unwrap();
        assert_eq!(got.iter().map(|i| i.reference.as_str()).collect::<Vec<_>>(), ["a:1", "b:1"]);
        assert_eq!((got[0].layers, got[0].size, got[0].loaded_ms), (3, i64::MAX as u64, 5));
        s.sync_images(&[row("b:1")]).unwrap();
        assert_eq!(s.images().unwrap(), [row("b:1")].map(|r| ImageRow { size: i64::MAX as u64, ..r }));
    }

    #[test]
    fn the_config_comes_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("web"), &cfg(), false).unwrap();
        assert_eq!(s.get("web").unwrap().config, cfg());
        s.conn.execute("UPDATE sandboxes SET config = '[1,2'", []).unwrap();
        assert!(matches!(s.get("web"), Err(StoreError::Corrupt(..))));
    }

    #[test]
    fn lifecycle_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("web"), &cfg(), false).unwrap();
        let e = s.insert(&n("web"), &cfg(), false).unwrap_err();
        assert!(matches!(e, StoreError::Exists(_)), "{e}");
        assert!(e.to_string().contains("already exists"));
        assert_eq!(s.get("web").unwrap().status, Status::Created);
        s.claim_start("web").unwrap();
        assert!(matches!(s.claim_start("web"), Err(StoreError::WrongStatus { .. })), "one starter at a time");
        let me = ProcessId::current().unwrap();
        let run = s.mark_running("web", me).unwrap();
        let rec = s.get("web").unwrap();
        assert_eq!(
            (rec.status, rec.process, rec.last_run.as_ref().map(|r| r.id)),
            (Status::Running, Some(me), Some(run))
        );
        assert!(s.remove("web").is_err(), "live sandboxes are not removed");
        assert!(s.reconcile().unwrap().is_empty(), "this process is alive");
        s.mark_stopped("web", Status::Stopped, "shut down on request").unwrap();
        let rec = s.get("web").unwrap();
        assert_eq!(rec.status, Status::Stopped);
        assert_eq!(rec.last_run.unwrap().exit_reason.as_deref(), Some("shut down on request"));
        s.remove("web").unwrap();
        assert!(matches!(s.get("web"), Err(StoreError::NotFound(_))));
        assert!(s.runs("web").unwrap().is_empty(), "history goes with the sandbox");
    }

    #[test]
    fn an_unreadable_row_is_skipped_by_list_and_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("bad"), &cfg(), false).unwrap();
        s.insert(&n("good"), &cfg(), false).unwrap();
        s.conn.execute("UPDATE sandboxes SET config = 'not json' WHERE name = 'bad'", []).unwrap();
        let names: Vec<String> = s.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, vec!["good".to_string()]);
        assert!(s.reconcile().is_ok());
        assert!(matches!(s.get("bad"), Err(StoreError::Corrupt(..))));
        assert!(s.exists("bad").unwrap());
        s.remove("bad").unwrap();
        assert!(!s.exists("bad").unwrap());
    }

    #[test]
    fn only_the_process_that_ran_a_sandbox_closes_its_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("web"), &cfg(), false).unwrap();
        s.claim_start("web").unwrap();
        let me = ProcessId::current().unwrap();
        s.mark_running("web", me).unwrap();
        let stale = ProcessId { pid: me.pid, start: me.start + 1 };
        assert!(!s.mark_stopped_by("web", stale, Status::Stopped, "late").unwrap());
        assert_eq!(s.get("web").unwrap().status, Status::Running, "a stale process changes nothing");
        assert!(s.mark_stopped_by("web", me, Status::Stopped, "done").unwrap());
        assert_eq!(s.get("web").unwrap().last_run.unwrap().exit_reason.as_deref(), Some("done"));
    }

    #[test]
    fn a_dead_process_is_marked_crashed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("gone"), &cfg(), false).unwrap();
        s.claim_start("gone").unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let p = ProcessId::of(child.id()).unwrap();
        s.mark_running("gone", p).unwrap();
        child.wait().unwrap();
        assert!(!p.is_alive());
        assert_eq!(s.reconcile().unwrap(), vec!["gone".to_string()]);
        let rec = s.get("gone").unwrap();
        assert_eq!(rec.status, Status::Crashed);
        assert!(rec.last_run.unwrap().exit_reason.unwrap().contains("crashed"));
        assert!(s.reconcile().unwrap().is_empty(), "reported once");
        s.claim_start("gone").unwrap();
    }

    #[test]
    fn a_dead_process_is_closed_with_what_its_exit_report_says_about_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let dead = |name: &str| {
            s.insert(&n(name), &cfg(), false).unwrap();
            s.claim_start(name).unwrap();
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let p = ProcessId::of(child.id()).unwrap();
            s.mark_running(name, p).unwrap();
            child.wait().unwrap();
            p
        };
        let (a, b) = (dead("stopped"), dead("violated"));
        dead("silent");
        let report = |name: &str, p: ProcessId| match name {
            "stopped" if p == a => Some("the guest powered off".to_string()),
            "violated" if p == b => Some(format!("{VIOLATION_PREFIX}execve (59) on thread tokio-runtime-w")),
            _ => None,
        };
        let mut changed = s.reconcile_with(report).unwrap();
        changed.sort();
        assert_eq!(changed, ["silent", "stopped", "violated"]);
        let rec = |name: &str| s.get(name).unwrap();
        assert_eq!(rec("stopped").status, Status::Stopped);
        assert_eq!(rec("stopped").last_run.unwrap().exit_reason.as_deref(), Some("the guest powered off"));
        assert_eq!(rec("violated").status, Status::Crashed);
        assert!(rec("violated").last_run.unwrap().exit_reason.unwrap().starts_with("seccomp violation: execve"));
        assert_eq!(rec("silent").status, Status::Crashed, "no report: crashed, as before");
    }

    #[test]
    fn a_start_abandoned_before_its_process_existed_is_marked_crashed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert(&n("orphan"), &cfg(), false).unwrap();
        s.claim_start("orphan").unwrap();
        assert!(s.reconcile().unwrap().is_empty(), "a fresh start is left alone");
        let long_ago = (now_ms() - 2 * STARTING_GRACE.as_millis() as u64) as i64;
        s.conn.execute("UPDATE sandboxes SET updated_ms = ?1", [long_ago]).unwrap();
        assert_eq!(s.reconcile().unwrap(), vec!["orphan".to_string()]);
        let rec = s.get("orphan").unwrap();
        assert_eq!(rec.status, Status::Crashed);
        assert!(rec.last_run.unwrap().exit_reason.unwrap().contains("client"));
        s.remove("orphan").unwrap();
    }

    #[test]
    fn the_database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("state.db")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_recycled_pid_is_not_the_sandbox_process() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        assert!(!ProcessId { pid: me.pid, start: me.start + 1 }.is_alive());
    }

    #[test]
    fn concurrent_writers_do_not_corrupt_the_store() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let home = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    // Each thread is its own connection, as separate `msb` processes are.
                    let s = Store::open(&home).unwrap();
                    let mut won = 0;
                    for i in 0..20 {
                        s.insert(&n(&format!("t{t}-{i}")), &cfg(), false).unwrap();
                        if s.insert(&n("contended"), &cfg(), false).is_ok() {
                            won += 1;
                        }
                        s.list().unwrap();
                    }
                    won
                })
            })
            .collect();
        let won: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(won, 1, "exactly one insert of a contended name succeeds");
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.list().unwrap().len(), 8 * 20 + 1);
    }
}
