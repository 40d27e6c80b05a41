//! The sandbox's interception CA in the guest: agentd re-executed as
//! `/proc/self/exe --msb-ca`, run by the host once the guest is ready when the sandbox has
//! secrets, with the CA certificate (PEM) on stdin.
//!
//! It writes the CA to `/usr/local/share/ca-certificates/msb-sandbox.crt` (and to
//! `/etc/pki/ca-trust/source/anchors/msb-sandbox.pem` where that directory exists), and puts
//! it into the system bundle between marker lines, **replacing** the block of an earlier
//! start (the CA is new on every start and a named sandbox keeps its root, so appending would
//! pile up old CAs). The bundle is rewritten beside itself and renamed into place, never
//! bind-mounted (`update-ca-certificates` renames over it). It prints the bundle's path.
//!
//! Invariants: only a PEM `CERTIFICATE` block of at most [`MAX_PEM`] bytes is taken; nothing
//! outside the marker block of the bundle changes.

use std::io::{Read, Write};
use std::path::Path;

/// The flag that selects this mode.
pub const FLAG: &str = "--msb-ca";
/// Largest CA PEM taken.
pub const MAX_PEM: usize = 16 * 1024;
const BEGIN: &str = "# msb sandbox CA: begin (replaced at every start)\n";
const END: &str = "# msb sandbox CA: end\n";
/// Bundles looked for, in order (Debian/Ubuntu/Alpine, RHEL/Fedora, others); the first is
/// made when none exists.
const BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];
/// Where the bare CA goes.
pub const BARE: &str = "/usr/local/share/ca-certificates/msb-sandbox.crt";

pub fn main(_args: &[String]) -> ! {
    match run() {
        Ok(bundle) => {
            println!("{bundle}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("msb-ca: {e}");
            std::process::exit(1)
        }
    }
}

fn run() -> Result<String, String> {
    let mut pem = Vec::new();
    std::io::stdin().take(MAX_PEM as u64 + 1).read_to_end(&mut pem).map_err(|e| format!("reading the CA: {e}"))?;
    let pem = String::from_utf8(pem).map_err(|_| "the CA is not text".to_string())?;
    let pem = check_pem(&pem)?;
    write_atomic(Path::new(BARE), pem.as_bytes())?;
    let anchors = Path::new("/etc/pki/ca-trust/source/anchors");
    if anchors.is_dir() {
        write_atomic(&anchors.join("msb-sandbox.pem"), pem.as_bytes())?;
    }
    let bundle = BUNDLES.iter().map(Path::new).find(|p| p.is_file()).unwrap_or(Path::new(BUNDLES[0]));
    let old = std::fs::read_to_string(bundle).unwrap_or_default();
    write_atomic(bundle, with_block(&old, &pem).as_bytes())?;
    Ok(bundle.display().to_string())
}

/// `pem` if it is exactly one `CERTIFICATE` block (surrounding blank space trimmed).
fn check_pem(pem: &str) -> Result<String, String> {
    if pem.len() > MAX_PEM {
        return Err(format!("the CA is larger than {MAX_PEM} bytes"));
    }
    let t = pem.trim();
    let ok = t.starts_with("-----BEGIN CERTIFICATE-----")
        && t.ends_with("-----END CERTIFICATE-----")
        && t.matches("-----BEGIN").count() == 1
        && t.bytes().all(|b| b == b'\n' || b == b'\r' || (0x20..0x7f).contains(&b));
    if !ok {
        return Err("the CA is not one PEM certificate".into());
    }
    Ok(format!("{t}\n"))
}

/// `bundle` with its marker block (if any) replaced by one holding `pem`, at the end.
fn with_block(bundle: &str, pem: &str) -> String {
    let mut out = String::with_capacity(bundle.len() + pem.len() + 128);
    let mut rest = bundle;
    while let Some(start) = rest.find(BEGIN) {
        out.push_str(&rest[..start]);
        rest = match rest[start..].find(END) {
            Some(end) => &rest[start + end + END.len()..],
            None => "", // a cut-off block: dropped
        };
    }
    out.push_str(rest);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str(pem);
    out.push_str(END);
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".msb-ca.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_block_is_replaced_not_appended() {
        let system = "-----BEGIN CERTIFICATE-----\nSYS\n-----END CERTIFICATE-----\n";
        let once = with_block(system, A);
        assert!(once.starts_with(system) && once.contains("AAAA"));
        let twice = with_block(&once, B);
        assert!(twice.starts_with(system) && twice.contains("BBBB") && !twice.contains("AAAA"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert_eq!(with_block("", A), format!("{BEGIN}{A}{END}"));
    }

    #[test]
    fn only_one_pem_certificate_is_taken() {
        assert!(check_pem(A).is_ok());
        assert!(check_pem(&format!("{A}{B}")).is_err());
        assert!(check_pem("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----").is_err());
        assert!(check_pem("junk").is_err());
    }
}
