//! Pulling from an OCI/Docker registry (distribution API v2), into the local [`Store`].
//!
//! A registry is as hostile as an archive: every document is at most
//! [`MAX_DOCUMENT`] bytes, every blob streams through the store's
//! verifying writer (a blob that does not hash to its digest is never kept), a manifest named
//! by digest must hash to it, and the image is named in the store only once its root
//! filesystem is built (see [`Store::load_documents`]).
//!
//! Transport: HTTPS with the system's roots (`/etc/ssl/certs/ca-certificates.crt`) plus an
//! optional extra CA (`--ca-cert`); plain HTTP only for loopback registries and those the
//! user marks insecure. Authentication: anonymous, or the user's Docker credentials
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, `auths.HOST.auth`), answered
//! to a `Basic` challenge directly and to a `Bearer` challenge through the registry's token
//! service, as registries do it. Credentials are never sent to another host: redirects (blob
//! downloads usually go to storage) drop the Authorization header.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::oci::{Digest, MAX_DOCUMENT};
use crate::store::{ImageRecord, Store};
use crate::{Error, Result};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Where to pull from and how.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// An extra CA certificate (PEM) to trust, for a private registry.
    pub ca_cert: Option<PathBuf>,
    /// Allow plain HTTP to this registry (always allowed for loopback).
    pub insecure: bool,
    /// How long a pull waits without progress (no byte at all, or less than
    /// [`MIN_PROGRESS`] bytes over this long) before it gives up; `None`: [`STALL`].
    pub stall: Option<Duration>,
}

/// How long a pull waits for the registry without progress, by default.
pub const STALL: Duration = Duration::from_secs(30);
/// Fewer bytes than this over a stall period is no progress (a registry that trickles).
pub const MIN_PROGRESS: u64 = 16 * 1024;
/// Most bytes one pull downloads, all blobs together (a registry cannot fill the disk with
/// 128 layers of 16 GiB each).
pub const MAX_PULL_BYTES: u64 = 32 << 30;

/// A parsed image reference: registry host, repository, tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    /// A tag, or a digest (`sha256:…`).
    pub reference: String,
}

impl Reference {
    /// Parses `[HOST[:PORT]/]NAME[:TAG][@DIGEST]`, docker's way: no host means Docker Hub,
    /// and a one-part name there is under `library/`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Image(format!("image reference {s:?}: {why}"));
        crate::store::normalize_reference(s)?;
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| bad(&e))?)),
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if h.contains(['.', ':']) || h == "localhost" => (h.to_string(), p.to_string()),
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (path.clone(), "latest".to_string()),
        };
        if repo.is_empty() || repo.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(bad("the repository name is empty or has empty, `.` or `..` parts"));
        }
        let repo = if host == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo };
        Ok(Reference { registry: host, repository: repo, reference: digest.map(String::from).unwrap_or(tag) })
    }

    /// The name the image gets in the store (as given, with `:latest` added if untagged).
    pub fn local_name(s: &str) -> Result<String> {
        crate::store::normalize_reference(s)
    }

    /// Whether the registry is this machine: `localhost`, or a literal loopback address
    /// (parsed, never a name that merely starts with `127.`).
    fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(rest) => rest.split_once(']').map_or(rest, |(h, _)| h),
            None => self.registry.rsplit_once(':').map_or(self.registry.as_str(), |(h, _)| h),
        };
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

/// A registry session: one agent, one repository, the credentials and token it earned.
struct Session {
    agent: ureq::Agent,
    base: String,
    repo: String,
    basic: Option<String>,
    auth: Option<String>,
}

/// Docker's stored credentials for `host`, as docker finds them: a credential helper named
/// for the host (`credHelpers`) or for all (`credsStore`), then `auths.HOST.auth` (base64 of
/// `user:password`). Returns the base64 `user:password` for Basic.
fn docker_credentials(host: &str) -> Option<String> {
    let path = std::env::var_os("DOCKER_CONFIG")
        .map(|d| PathBuf::from(d).join("config.json"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")))?;
    let text = std::fs::read(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let hub = host == "registry-1.docker.io" || host == "docker.io";
    let server = if hub { "https://index.docker.io/v1/".to_string() } else { host.to_string() };
    let helper =
        v.get("credHelpers").and_then(|h| h.get(host)).or_else(|| v.get("credsStore")).and_then(|h| h.as_str());
    if let Some(found) = helper.and_then(|h| credential_helper(h, &server)) {
        return Some(found);
    }
    let auths = v.get("auths")?.as_object()?;
    let keys = [host.to_string(), format!("https://{host}"), format!("https://{host}/v1/"), format!("http://{host}")];
    keys.iter()
        .chain(hub.then_some(&server))
        .find_map(|k| auths.get(k)?.get("auth")?.as_str().map(String::from))
        .filter(|a| !a.is_empty())
}

/// Most a credential helper may print.
const MAX_HELPER_OUTPUT: u64 = 64 * 1024;
/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks `docker-credential-NAME get` for `server`'s credentials (docker's helper protocol:
/// the server on stdin, `{"Username", "Secret"}` on stdout). A helper name is a plain word;
/// an identity token (`<token>` user) is not a password and is not used.
fn credential_helper(name: &str, server: &str) -> Option<String> {
    use base64::Engine;
    use std::io::Write;
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        tracing::warn!(helper = name, "ignoring a credential helper with an odd name");
        return None;
    }
    let program = format!("docker-credential-{name}");
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(%program, "credential helper did not start: {e}"))
        .ok()?;
    let _ = child.stdin.take().map(|mut i| i.write_all(server.as_bytes()));
    let out = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.take(MAX_HELPER_OUTPUT).read_to_end(&mut buf);
        buf
    });
    let end = std::time::Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(%program, "credential helper did not answer in time");
                return None;
            }
        }
    };
    let buf = reader.join().ok()?;
    if !status.success() {
        // No credentials for this server: pull anonymously.
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    let (user, secret) = (v.get("Username")?.as_str()?, v.get("Secret")?.as_str()?);
    if user.is_empty() || user == "<token>" || secret.is_empty() {
        return None;
    }
    Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
}

/// The certificates to trust: the system bundle and `extra`.
fn roots(extra: Option<&Path>) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let mut certs = Vec::new();
    let mut add = |path: &Path, required: bool| -> Result<()> {
        let pem = match std::fs::read(path) {
            Ok(p) => p,
            Err(_) if !required => return Ok(()),
            Err(source) => {
                return Err(Error::Io { what: "reading the CA certificate", path: path.to_path_buf(), source })
            }
        };
        let before = certs.len();
        for item in ureq::tls::parse_pem(&pem).flatten() {
            if let ureq::tls::PemItem::Certificate(c) = item {
                certs.push(c.to_owned());
            }
        }
        if required && certs.len() == before {
            return Err(Error::Image(format!("{} holds no PEM certificate", path.display())));
        }
        Ok(())
    };
    add(Path::new("/etc/ssl/certs/ca-certificates.crt"), false)?;
    if let Some(p) = extra {
        add(p, true)?;
    }
    Ok(certs)
}

/// One `key="value"` list of a WWW-Authenticate challenge.
fn challenge_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        out.insert(key, value);
    }
    out
}

impl Session {
    fn get(&self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        req.call().map_err(|e| Error::Image(format!("GET {url}: {e}")))
    }

    /// GET with one round of authentication on a 401.
    fn fetch(&mut self, url: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let resp = self.get(url, accept)?;
        if resp.status() != 401 {
            return check(url, resp);
        }
        let challenge =
            resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        if let Some(params) = challenge.strip_prefix("Bearer ").map(challenge_params) {
            let realm = params
                .get("realm")
                .ok_or_else(|| Error::Image(format!("{url}: a Bearer challenge without a realm")))?;
            // The realm is the registry's to name, but not anywhere: HTTPS (plain HTTP only
            // for a plain loopback registry), and the user's credentials go only to a realm
            // on the registry's own site (its host's last two labels: auth.docker.io for
            // registry-1.docker.io).
            let uri: ureq::http::Uri = realm
                .parse()
                .map_err(|_| Error::Image(format!("{url}: a Bearer realm {realm:?} that is not a URL")))?;
            let plain_ok = self.base.starts_with("http://");
            match uri.scheme_str() {
                Some("https") => {}
                Some("http") if plain_ok => {}
                _ => {
                    return Err(Error::Image(format!(
                        "{url}: the registry names a token service {realm:?} that is not HTTPS; refusing to send a request there"
                    )))
                }
            }
            let site = |h: &str| {
                let labels: Vec<&str> = h.trim_end_matches('.').rsplit('.').take(2).collect();
                labels.join(".")
            };
            let base: Option<ureq::http::Uri> = self.base.parse().ok();
            let same_site = match (uri.host(), base.as_ref().and_then(|b| b.host())) {
                (Some(realm_host), Some(registry_host)) => site(realm_host) == site(registry_host),
                _ => false,
            };
            let mut token_url = format!("{realm}?");
            for k in ["service", "scope"] {
                if let Some(v) = params.get(k) {
                    token_url.push_str(&format!("{k}={}&", urlencode(v)));
                }
            }
            let mut req = self.agent.get(token_url.trim_end_matches(['&', '?']));
            if let Some(b) = self.basic.as_ref().filter(|_| same_site) {
                req = req.header("Authorization", format!("Basic {b}"));
            }
            let resp = req.call().map_err(|e| Error::Image(format!("token service {realm}: {e}")))?;
            let resp = check(realm, resp)?;
            let body = document(resp, &format!("token service {realm}"))?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| Error::Image(format!("token service {realm}: {e}")))?;
            let token = v
                .get("token")
                .or_else(|| v.get("access_token"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::Image(format!("token service {realm} returned no token")))?;
            self.auth = Some(format!("Bearer {token}"));
        } else if challenge.starts_with("Basic") {
            let b = self.basic.clone().ok_or_else(|| {
                Error::Image(format!(
                    "{url}: the registry wants a user name and password; log in with `docker login {}` (msb reads ~/.docker/config.json)",
                    self.base
                ))
            })?;
            self.auth = Some(format!("Basic {b}"));
        } else {
            return Err(Error::Image(format!("{url}: 401 with an unknown challenge {challenge:?}")));
        }
        let resp = self.get(url, accept)?;
        if resp.status() == 401 {
            return Err(Error::Image(format!(
                "{url}: access denied; check your credentials (`docker login {}`)",
                self.base
            )));
        }
        check(url, resp)
    }
}

fn check(url: &str, resp: ureq::http::Response<ureq::Body>) -> Result<ureq::http::Response<ureq::Body>> {
    match resp.status().as_u16() {
        200..=299 => Ok(resp),
        404 => Err(Error::Image(format!("{url}: not found (no such image, tag or blob)"))),
        s => Err(Error::Image(format!("{url}: the registry answered HTTP {s}"))),
    }
}

/// A response body of at most [`MAX_DOCUMENT`] bytes.
fn document(resp: ureq::http::Response<ureq::Body>, what: &str) -> Result<Vec<u8>> {
    resp.into_body().with_config().limit(MAX_DOCUMENT).read_to_vec().map_err(|e| Error::Image(format!("{what}: {e}")))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// A step, as a line of text.
    Step(&'a str),
    /// A blob started to arrive; `size` is what the registry announced, if it did (shown
    /// only: the bytes are bounded and verified whatever it says).
    Started { digest: &'a Digest, size: Option<u64> },
    /// `done` bytes of the blob have arrived.
    Progress { digest: &'a Digest, done: u64 },
    /// The blob arrived whole and matched its digest.
    Finished { digest: &'a Digest },
}

/// A reader that reports how much has passed through it.
struct Counting<R, F> {
    inner: R,
    done: u64,
    report: F,
    /// What is read, for errors ("blob sha256:…").
    what: String,
    stall: Duration,
    /// Bytes at the start of the current stall window, and when it started.
    window: (u64, std::time::Instant),
    /// Most bytes this reader may still return (what is left of [`MAX_PULL_BYTES`]).
    limit: u64,
}

impl<R: Read, F: FnMut(u64)> Read for Counting<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("{}: waiting for data from the registry after {} bytes: {e}", self.what, self.done),
            )
        })?;
        self.done += n as u64;
        if self.done > self.limit {
            return Err(std::io::Error::other(format!(
                "{}: the image is larger than {MAX_PULL_BYTES} bytes of downloads",
                self.what
            )));
        }
        (self.report)(self.done);
        let (at_start, since) = self.window;
        if since.elapsed() >= self.stall {
            if self.done - at_start < MIN_PROGRESS && n > 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{}: the registry sent {} bytes in {} s (less than {MIN_PROGRESS}): giving up on a stalled download",
                        self.what,
                        self.done - at_start,
                        self.stall.as_secs()
                    ),
                ));
            }
            self.window = (self.done, std::time::Instant::now());
        }
        Ok(n)
    }
}

/// Pulls `image` into `store` and returns its record, telling `progress` as it goes.
pub fn pull(
    store: &Store,
    image: &str,
    opts: &PullOptions,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<ImageRecord> {
    let r = Reference::parse(image)?;
    let local = Reference::local_name(image)?;
    // HTTPS first; plain HTTP for an insecure registry, and for a loopback one whose HTTPS
    // fails for a reason other than its certificate (as docker treats localhost).
    let plain_ok = r.is_loopback() || opts.insecure;
    let scheme = if opts.insecure { "http" } else { "https" };
    let certs = roots(opts.ca_cert.as_deref())?;
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .https_only(!plain_ok)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // A registry that accepts and then sends nothing: no read waits longer than this.
        .timeout_per_read(Some(opts.stall.unwrap_or(STALL)))
        .timeout_per_write(Some(opts.stall.unwrap_or(STALL)))
        .max_redirects(5)
        .build()
        .into();
    let host = r.api_host().to_string();
    let mut s = Session {
        agent,
        base: format!("{scheme}://{host}"),
        repo: r.repository.clone(),
        basic: docker_credentials(&host).or_else(|| docker_credentials(&r.registry)),
        auth: None,
    };
    let url = format!("{}/v2/{}/manifests/{}", s.base, s.repo, r.reference);
    progress(PullEvent::Step(&format!("{local}: resolving {url}")));
    let resp = match s.fetch(&url, Some(ACCEPT)) {
        Err(e) if plain_ok && scheme == "https" && !e.to_string().to_lowercase().contains("certificate") => {
            s.base = format!("http://{host}");
            let url = format!("{}/v2/{}/manifests/{}", s.base, s.repo, r.reference);
            progress(PullEvent::Step(&format!("{local}: no HTTPS on a loopback registry ({e}); trying {url}")));
            s.fetch(&url, Some(ACCEPT))?
        }
        other => other?,
    };
    let top = document(resp, &url)?;
    let top_digest = Digest::of(&top);
    if let Ok(want) = Digest::parse(&r.reference) {
        if want != top_digest {
            return Err(Error::Image(format!("{url}: the manifest hashes to {top_digest}, not the {want} asked for")));
        }
    }
    store.put_document(&top, &top_digest)?;
    let session = std::cell::RefCell::new(s);
    let progress = std::cell::RefCell::new(progress);
    let pulled = std::cell::Cell::new(0u64);
    let fetch = |st: &Store, d: &Digest| -> Result<()> {
        if st.has_blob(d) {
            return Ok(());
        }
        let mut s = session.borrow_mut();
        let blob_url = format!("{}/v2/{}/blobs/{d}", s.base, s.repo);
        let resp = match s.fetch(&blob_url, None) {
            Ok(r) => r,
            // Manifests named by an index are fetched from the manifests endpoint.
            Err(_) => {
                let manifest_url = format!("{}/v2/{}/manifests/{d}", s.base, s.repo);
                s.fetch(&manifest_url, Some(ACCEPT))?
            }
        };
        drop(s);
        let size = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        (progress.borrow_mut())(PullEvent::Started { digest: d, size });
        let report = |done| (progress.borrow_mut())(PullEvent::Progress { digest: d, done });
        let reader = Counting {
            inner: resp.into_body().into_reader(),
            done: 0,
            report,
            what: format!("blob {d}"),
            stall: opts.stall.unwrap_or(STALL),
            window: (0, std::time::Instant::now()),
            limit: MAX_PULL_BYTES.saturating_sub(pulled.get()),
        };
        pulled.set(pulled.get() + st.put_verified(reader, d)?);
        (progress.borrow_mut())(PullEvent::Finished { digest: d });
        Ok(())
    };
    store.load_documents(&top_digest, &local, &fetch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 14: a reference is checked against the distribution grammar before anything
    /// is sent, with a reason; FS11: loopback is a parsed address, not a name prefix.
    #[test]
    fn references_are_checked_against_the_distribution_grammar() {
        for good in [
            "python",
            "python:3.12-slim",
            "msb/debian:12",
            "ghcr.io/org/app_name:v1.0",
            "localhost:5000/a/b",
            "registry.example.com:443/a--b/c__d.e:TAG_1",
            "[::1]:5000/x/y:z",
            "127.0.0.1:5000/team/app",
        ] {
            assert!(Reference::parse(good).is_ok(), "{good}: {:?}", Reference::parse(good).err());
        }
        for (bad, why) in [
            ("Python", "capital letters"),
            ("ghcr.io/Org/app", "capital letters"),
            ("a//b", "malformed repository path component"),
            ("a_/b", "malformed repository path component"),
            ("a___b", "malformed repository path component"),
            ("a:.tag", "malformed tag"),
            ("a:-tag", "malformed tag"),
            ("ghcr.io/a@sha256:abc", "malformed digest"),
            ("exa_mple.com/a/b", "malformed registry host"),
            ("-host.com/a", "must start with a letter or digit"),
            ("host.com:99999999/a", "malformed registry host"),
        ] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse(&long).is_err());
        for (host, lo) in [
            ("127.0.0.1:5000", true),
            ("[::1]:5000", true),
            ("localhost", true),
            ("127.example.com", false),
            ("127.0.0.1.nip.io", false),
        ] {
            let r = Reference { registry: host.into(), repository: "a".into(), reference: "latest".into() };
            assert_eq!(r.is_loopback(), lo, "{host}");
        }
    }

    /// Finding 15: a registry that accepts and then says nothing is given up on after the
    /// stall time, with an error that says what it waited for.
    #[test]
    fn a_silent_registry_is_given_up_on() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let held = std::thread::spawn(move || {
            let mut keep = Vec::new();
            for s in l.incoming().take(2).flatten() {
                keep.push(s); // accepted, never answered
            }
            std::thread::sleep(Duration::from_secs(10));
        });
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let opts = PullOptions { stall: Some(Duration::from_secs(1)), ..PullOptions::default() };
        let t0 = std::time::Instant::now();
        let e = pull(&store, &format!("127.0.0.1:{port}/a/b"), &opts, &mut |_| {}).unwrap_err().to_string();
        assert!(t0.elapsed() < Duration::from_secs(8), "took {:?}", t0.elapsed());
        assert!(e.contains(&format!("127.0.0.1:{port}")) && e.to_lowercase().contains("timeout"), "{e}");
        drop(held);
    }

    /// Finding 15: a trickle (a byte now and then) is no progress either.
    #[test]
    fn a_trickling_download_is_given_up_on() {
        struct Trickle;
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(20));
                buf[0] = 0;
                Ok(1)
            }
        }
        let mut r = Counting {
            inner: Trickle,
            done: 0,
            report: |_| {},
            what: "blob sha256:abc".into(),
            stall: Duration::from_millis(300),
            window: (0, std::time::Instant::now()),
            limit: u64::MAX,
        };
        let e = std::io::copy(&mut r, &mut std::io::sink()).unwrap_err().to_string();
        assert!(e.starts_with("blob sha256:abc: the registry sent") && e.contains("stalled"), "{e}");
    }

    #[test]
    fn references_follow_dockers_rules() {
        let r = Reference::parse("python:3.12").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("docker.io", "library/python", "3.12")
        );
        let r = Reference::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "team/app", "latest")
        );
        assert!(r.is_loopback());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/i@{d}")).unwrap();
        assert_eq!(r.reference, d);
        assert!(!r.is_loopback());
        assert!(Reference::parse("ghcr.io/../x").is_err());
        assert!(Reference::parse("a b").is_err());
    }

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        assert_eq!(urlencode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
