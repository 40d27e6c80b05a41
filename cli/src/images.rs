//! `msb pull`, `msb load`, `msb images`, `msb rmi`, `msb image prune`, and the image's run defaults
//! (ENTRYPOINT, CMD, ENV, WORKDIR, USER) applied to a command as docker applies them.

use std::collections::BTreeSet;
use std::path::Path;

use msb_control_plane::{Error, Msb, Result};
use msb_images::oci::RunConfig;
use msb_images::registry::PullEvent;
use msb_images::store::{ImageRecord, Store};

use crate::CommandArgs;

pub fn err(e: msb_images::Error) -> Error {
    Error::Image(e)
}

pub fn store(msb: &Msb) -> Result<Store> {
    Store::open(msb.home()).map_err(err)
}

/// Loads an archive; each image's root filesystem is built at once (so a first `msb run`
/// does not wait for it, and a bad layer is reported now, before the image is named).
pub fn load(msb: &Msb, input: &Path, tag: Option<&str>) -> Result<()> {
    let store = store(msb)?;
    for rec in store.load(input, tag).map_err(err)? {
        println!("Loaded image: {} ({})", rec.reference, short(&rec));
    }
    msb.sync_images().map(drop)
}

/// Pulls an image; progress goes to stderr: a bar per blob on a terminal, plain lines
/// (a blob's start and end) otherwise.
pub fn pull(msb: &Msb, reference: &str, ca_cert: Option<std::path::PathBuf>, insecure: bool) -> Result<()> {
    use std::io::IsTerminal;
    let store = store(msb)?;
    let opts = msb_images::registry::PullOptions { ca_cert, insecure, stall: None };
    let rec = if std::io::stderr().is_terminal() {
        let mut bars = Bars::default();
        msb_images::registry::pull(&store, reference, &opts, &mut |ev| bars.show(ev))
    } else {
        msb_images::registry::pull(&store, reference, &opts, &mut plain)
    }
    .map_err(err)?;
    println!("Pulled image: {} ({})", rec.reference, short(&rec));
    msb.sync_images().map(drop)
}

fn plain(ev: PullEvent) {
    match ev {
        PullEvent::Step(line) => eprintln!("{line}"),
        PullEvent::Started { digest, size: Some(n) } => eprintln!("{}: fetching ({})", digest.short(), mib(n)),
        PullEvent::Started { digest, size: None } => eprintln!("{}: fetching", digest.short()),
        PullEvent::Finished { digest } => eprintln!("{}: verified", digest.short()),
        PullEvent::Progress { .. } => {}
    }
}

/// One progress bar per blob (a pull has at most the manifest's layers and documents).
#[derive(Default)]
struct Bars {
    all: indicatif::MultiProgress,
    bars: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl Bars {
    fn show(&mut self, ev: PullEvent) {
        let style = |known: bool| {
            let t = if known {
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}"
            } else {
                "{prefix} {spinner} {bytes} {bytes_per_sec}"
            };
            indicatif::ProgressStyle::with_template(t).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        };
        match ev {
            PullEvent::Step(line) => {
                let _ = self.all.println(line);
            }
            PullEvent::Started { digest, size } => {
                let bar = self.all.add(indicatif::ProgressBar::new(size.unwrap_or(0)));
                bar.set_style(style(size.is_some()).progress_chars("=> "));
                bar.set_prefix(digest.short().to_string());
                self.bars.insert(digest.to_string(), bar);
            }
            PullEvent::Progress { digest, done } => {
                if let Some(b) = self.bars.get(digest.as_str()) {
                    b.set_position(done);
                }
            }
            PullEvent::Finished { digest } => {
                if let Some(b) = self.bars.get(digest.as_str()) {
                    b.finish();
                }
            }
        }
    }
}

fn short(rec: &ImageRecord) -> &str {
    &rec.config.hex()[..12]
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MB", bytes as f64 / 1e6)
}

/// Lists the images from the state store (mirrored from the image store first), with the
/// sandboxes recorded with each.
pub fn list(msb: &Msb, json: bool) -> Result<()> {
    let store = store(msb)?;
    let rows = msb.sync_images()?;
    let mut users: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in msb.list()? {
        if let Some(i) = r.config.image_ref() {
            users.entry(i.to_string()).or_default().push(r.name.clone());
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                let built = msb_images::oci::Digest::parse(&r.id).is_ok_and(|id| store.rootfs_of(&id).is_file());
                serde_json::json!({
                    "reference": r.reference,
                    "id": r.id,
                    "manifest": r.manifest,
                    "layers": r.layers,
                    "size": r.size,
                    "rootfs_built": built,
                    "loaded": msb_control_plane::store::format_ms(r.loaded_ms),
                    "sandboxes": users.get(&r.reference).cloned().unwrap_or_default(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("{:<40} {:<12} {:>7} {:>10} {:>9}", "REFERENCE", "ID", "LAYERS", "SIZE", "SANDBOXES");
    for r in &rows {
        let id = r.id.strip_prefix("sha256:").unwrap_or(&r.id);
        let n = users.get(&r.reference).map_or(0, Vec::len);
        println!("{:<40} {:<12} {:>7} {:>10} {n:>9}", r.reference, &id[..id.len().min(12)], r.layers, mib(r.size));
    }
    Ok(())
}

/// Config digests of the images that sandboxes are recorded with.
fn in_use(msb: &Msb, store: &Store) -> Result<(BTreeSet<String>, BTreeSet<msb_images::oci::Digest>)> {
    let mut refs = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for r in msb.list()? {
        if let Some(i) = r.config.image_ref() {
            refs.insert(i.to_string());
            if let Ok(rec) = store.get(i) {
                ids.insert(rec.config);
            }
            // The root filesystem the sandbox's disk was made over, whatever its name is now.
            if let Some(id) = r.config.image_id.as_deref().and_then(|d| msb_images::oci::Digest::parse(d).ok()) {
                ids.insert(id);
            }
        }
    }
    Ok((refs, ids))
}

pub fn remove(msb: &Msb, reference: &str) -> Result<()> {
    let store = store(msb)?;
    let rec = store.get(reference).map_err(err)?;
    let (refs, _) = in_use(msb, &store)?;
    if refs.contains(&rec.reference) {
        return Err(Error::Config(format!(
            "image {} is used by a sandbox; remove the sandbox first (`msb ls`)",
            rec.reference
        )));
    }
    store.remove(reference).map_err(err)?;
    println!("Untagged: {}", rec.reference);
    msb.sync_images().map(drop)
}

pub fn prune(msb: &Msb) -> Result<()> {
    let store = store(msb)?;
    let (_, ids) = in_use(msb, &store)?;
    let freed = store.prune(&ids).map_err(err)?;
    println!("Total reclaimed space: {}", mib(freed));
    msb.sync_images().map(drop)
}

/// Applies the image's defaults to `cmd`: for a run, the argv (ENTRYPOINT, then the given
/// command or else CMD; `--entrypoint` replaces ENTRYPOINT and drops CMD); for both, ENV
/// before the user's own variables, WORKDIR and USER unless given.
pub fn defaults(
    msb: &Msb,
    image: Option<&str>,
    cmd: &mut CommandArgs,
    entrypoint: Option<&str>,
    run: bool,
) -> Result<()> {
    let Some(image) = image else { return Ok(()) };
    let store = store(msb)?;
    let rec = store.get(image).map_err(err)?;
    let rc = store.run_config(&rec).map_err(err)?;
    apply(&rc, cmd, entrypoint, run).map_err(Error::Config)
}

fn apply(
    rc: &RunConfig,
    cmd: &mut CommandArgs,
    entrypoint: Option<&str>,
    run: bool,
) -> std::result::Result<(), String> {
    if run {
        let mut argv: Vec<String> = match entrypoint {
            Some("") => Vec::new(),
            Some(e) => vec![e.to_string()],
            None => rc.entrypoint.clone(),
        };
        if !cmd.command.is_empty() {
            argv.append(&mut cmd.command);
        } else if entrypoint.is_none() {
            argv.extend(rc.cmd.iter().cloned());
        }
        if argv.is_empty() {
            return Err("the image has no ENTRYPOINT or CMD; give the command to run after `--`".into());
        }
        cmd.command = argv;
    }
    let mut env: Vec<String> = rc
        .env
        .iter()
        .filter(|kv| {
            let key = kv.split('=').next().unwrap_or_default();
            !cmd.env.iter().any(|u| u.split('=').next() == Some(key))
        })
        .filter(|kv| kv.contains('='))
        .cloned()
        .collect();
    env.append(&mut cmd.env);
    cmd.env = env;
    if cmd.workdir.is_none() && !rc.working_dir.is_empty() {
        cmd.workdir = Some(rc.working_dir.clone());
    }
    if cmd.user.is_none() && !rc.user.is_empty() {
        cmd.user = Some(rc.user.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        cmd: CommandArgs,
    }

    fn args(a: &[&str]) -> CommandArgs {
        T::parse_from(std::iter::once("t").chain(a.iter().copied())).cmd
    }

    fn rc() -> RunConfig {
        RunConfig {
            env: vec!["PATH=/usr/bin".into(), "LANG=C.UTF-8".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into(), "--port=1".into()],
            working_dir: "/app".into(),
            user: "app".into(),
        }
    }

    #[test]
    fn run_follows_dockers_entrypoint_and_cmd_rules() {
        let mut c = args(&[]);
        apply(&rc(), &mut c, None, true).unwrap();
        assert_eq!(c.command, ["/entry", "serve", "--port=1"]);
        let mut c = args(&["--", "sh", "-c", "x"]);
        apply(&rc(), &mut c, None, true).unwrap();
        assert_eq!(c.command, ["/entry", "sh", "-c", "x"], "a command replaces CMD only");
        let mut c = args(&["--", "-v"]);
        apply(&rc(), &mut c, Some("/other"), true).unwrap();
        assert_eq!(c.command, ["/other", "-v"]);
        let mut c = args(&[]);
        apply(&rc(), &mut c, Some("/other"), true).unwrap();
        assert_eq!(c.command, ["/other"], "--entrypoint drops CMD");
        let mut c = args(&[]);
        let e = apply(&RunConfig::default(), &mut c, None, true).unwrap_err();
        assert!(e.contains("no ENTRYPOINT or CMD"));
    }

    #[test]
    fn env_workdir_and_user_are_defaults_the_user_overrides() {
        let mut c = args(&["-e", "LANG=fr", "-u", "root", "--", "id"]);
        apply(&rc(), &mut c, None, false).unwrap();
        assert_eq!(c.command, ["id"], "exec keeps its command");
        assert_eq!(c.env, ["PATH=/usr/bin", "LANG=fr"]);
        assert_eq!(c.user.as_deref(), Some("root"));
        assert_eq!(c.workdir.as_deref(), Some("/app"));
    }
}
