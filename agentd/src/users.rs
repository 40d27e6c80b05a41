//! Resolves `USER[:GROUP]` against the guest's own `/etc/passwd` and `/etc/group`.
//!
//! The files belong to the guest image; a line that does not parse is skipped, never trusted
//! half-way. Numbers are taken as given (a uid need not have a passwd entry).

use msb_protocol::{Ident, UserSpec};

/// The uid, gid, supplementary groups and home directory to run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub uid: u32,
    pub gid: u32,
    /// Groups that list the user as a member in /etc/group (at most [`MAX_GROUPS`]).
    pub groups: Vec<u32>,
    pub home: String,
}

/// Most supplementary groups a command gets.
pub const MAX_GROUPS: usize = 64;

/// The gids of the groups that name `user` as a member.
fn memberships(text: &str, user: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[3].split(',').any(|m| m.trim() == user)).then(|| f[2].parse().ok())?
        })
        .take(MAX_GROUPS)
        .collect()
}

/// (name, id, primary gid, home) of each well-formed passwd line.
fn passwd(text: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then_some(())?;
        Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?, f[5]))
    })
}

fn group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok())?
    })
}

/// Resolves `spec` with the given passwd and group file contents.
pub fn resolve_in(spec: &UserSpec, passwd_text: &str, group_text: &str) -> Result<Resolved, String> {
    let (uid, primary, home, name) = match &spec.user {
        Ident::Id(uid) => {
            let entry = passwd(passwd_text).find(|(_, id, _, _)| id == uid);
            (*uid, entry.map(|e| e.2).unwrap_or(*uid), entry.map(|e| e.3.to_string()), entry.map(|e| e.0))
        }
        Ident::Name(n) => {
            let (name, uid, gid, home) = passwd(passwd_text)
                .find(|(name, ..)| name == n)
                .ok_or_else(|| format!("no user named {n:?} in the guest's /etc/passwd; use a UID or add the user"))?;
            (uid, gid, Some(home.to_string()), Some(name))
        }
    };
    let groups = name.map(|n| memberships(group_text, n)).unwrap_or_default();
    let gid = match &spec.group {
        None => primary,
        Some(Ident::Id(g)) => *g,
        Some(Ident::Name(g)) => group(group_text, g)
            .ok_or_else(|| format!("no group named {g:?} in the guest's /etc/group; use a GID or add the group"))?,
    };
    let home =
        home.filter(|h| h.starts_with('/')).unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() });
    Ok(Resolved { uid, gid, groups, home })
}

/// Resolves `spec` against the guest's files.
pub fn resolve(spec: &UserSpec) -> Result<Resolved, String> {
    let p = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let g = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &p, &g)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nbroken line\nmsb:x:1000:100:msb:/home/msb:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:\nwheel:x:10:msb\n";

    fn r(s: &str) -> Result<Resolved, String> {
        resolve_in(&UserSpec::parse(s).unwrap(), PASSWD, GROUP)
    }

    #[test]
    fn names_numbers_and_groups() {
        assert_eq!(r("root").unwrap(), Resolved { uid: 0, gid: 0, groups: vec![], home: "/root".into() });
        assert_eq!(r("msb").unwrap(), Resolved { uid: 1000, gid: 100, groups: vec![10], home: "/home/msb".into() });
        assert_eq!(r("msb:wheel").unwrap().gid, 10);
        assert_eq!(r("1000").unwrap().gid, 100, "a known uid gets its primary group");
        assert_eq!(r("1000").unwrap().groups, vec![10], "and its memberships");
        assert_eq!(r("4242").unwrap(), Resolved { uid: 4242, gid: 4242, groups: vec![], home: "/".into() });
        assert_eq!(r("4242:7").unwrap().gid, 7);
        assert!(r("nobody").unwrap_err().contains("/etc/passwd"));
        assert!(r("msb:staff").unwrap_err().contains("/etc/group"));
    }
}
