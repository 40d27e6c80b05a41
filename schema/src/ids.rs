//! Validated names. A [`SandboxName`] becomes a directory and a socket name on the host, so
//! it is checked once, here, before anything is recorded or created.

use serde::{Deserialize, Serialize};

/// Longest sandbox name.
pub const MAX_NAME: usize = 63;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {name:?}: {why}")]
pub struct NameError {
    /// What the name is of, as the user typed it (`sandbox`, `volume`).
    pub what: &'static str,
    pub name: String,
    pub why: String,
}

/// A sandbox name: 1..=63 characters from `[A-Za-z0-9_.-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SandboxName(String);

impl SandboxName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        Self::named(name, "sandbox")
    }

    /// Checks `name`, a name of `what` (a volume's name follows the same rule, and an
    /// error speaks of what the user named).
    pub fn named(name: &str, what: &'static str) -> Result<Self, NameError> {
        let why = if name.is_empty() {
            Some("it is empty".to_string())
        } else if name.len() > MAX_NAME {
            Some(format!("it is {} characters long; the limit is {MAX_NAME}", name.len()))
        } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            Some("it must start with a letter or digit".into())
        } else {
            let bad = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)));
            bad.map(|c| format!("{c:?} is not allowed; use letters, digits, '_', '.' and '-'"))
        };
        match why {
            Some(why) => Err(NameError { what, name: name.to_string(), why }),
            None => Ok(SandboxName(name.to_string())),
        }
    }

    /// A name for a sandbox that lives for one run: `PREFIX-PID-NANOS` (unique among live
    /// processes: the pid plus the sub-second clock).
    pub fn ephemeral(prefix: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        Self::new(&format!("{prefix}-{}-{nanos:08x}", std::process::id())).expect("prefix is a valid name start")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SandboxName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SandboxName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for SandboxName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SandboxName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["a", "web-1", "A.b_c", &"x".repeat(MAX_NAME)] {
            assert_eq!(SandboxName::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", "é", "..", &"x".repeat(MAX_NAME + 1)] {
            let e = SandboxName::new(bad).unwrap_err();
            assert_eq!(e.name, bad);
            assert!(e.to_string().contains("invalid sandbox name"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_name_is_checked_when_it_is_decoded_too() {
        let bytes = postcard::to_allocvec("../../etc").unwrap();
        assert!(postcard::from_bytes::<SandboxName>(&bytes).is_err());
        let bytes = postcard::to_allocvec("web").unwrap();
        assert_eq!(postcard::from_bytes::<SandboxName>(&bytes).unwrap().as_str(), "web");
    }

    #[test]
    fn ephemeral_names_are_valid_and_distinct() {
        let a = SandboxName::ephemeral("run");
        assert!(a.as_str().starts_with("run-"));
        assert!(a.as_str().len() <= MAX_NAME);
    }
}
