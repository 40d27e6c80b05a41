//! The vault's pure core: values in locked memory and the substitution decision. See the
//! crate doc for the gates.

use base64::Engine as _;
use msb_schema::secret::{
    authority_names, check_secrets, normalize_name, Answer, FlowIdentity, Location, OnViolation, RequestHead,
    ResponseMask, SecretError, SecretHost, SecretInfo, SecretName, SecretSpec, SecretValue, Violation,
};
use zeroize::{Zeroize, Zeroizing};

/// A value's bytes in a buffer of their own that never moves: locked against swapping
/// where the system allows (`RLIMIT_MEMLOCK`), wiped before it is freed.
pub struct Locked {
    bytes: Box<[u8]>,
    guard: Option<region::LockGuard>,
}

impl Locked {
    pub fn new(value: SecretValue) -> Locked {
        let bytes: Box<[u8]> = value.expose().to_vec().into_boxed_slice();
        drop(value); // wiped
        let guard = region::lock(bytes.as_ptr(), bytes.len()).ok();
        Locked { bytes, guard }
    }

    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether its pages are locked.
    pub fn is_locked(&self) -> bool {
        self.guard.is_some()
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        self.bytes.zeroize();
        self.guard.take(); // unlocked only once wiped
    }
}

struct Entry {
    spec: SecretSpec,
    value: Locked,
}

/// The table of secrets.
#[derive(Default)]
pub struct Vault {
    entries: Vec<Entry>,
}

/// Why the vault could not do what the control side asked.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("no secret named {0} in this sandbox")]
    Unknown(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl Vault {
    /// A vault holding `secrets` (checked together, see [`check_secrets`]).
    pub fn new(secrets: Vec<(SecretSpec, SecretValue)>) -> Result<Vault, VaultError> {
        let specs: Vec<SecretSpec> = secrets.iter().map(|(s, _)| s.clone()).collect();
        check_secrets(&specs)?;
        let entries = secrets.into_iter().map(|(spec, v)| Entry { spec, value: Locked::new(v) }).collect();
        Ok(Vault { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The secrets' hosts (what the gateway intercepts).
    pub fn hosts(&self) -> Vec<SecretHost> {
        self.entries.iter().flat_map(|e| e.spec.hosts.iter().cloned()).collect()
    }

    fn entry(&mut self, name: &SecretName) -> Result<&mut Entry, VaultError> {
        self.entries.iter_mut().find(|e| e.spec.name == *name).ok_or_else(|| VaultError::Unknown(name.to_string()))
    }

    /// A new value for `name`; the old one is wiped.
    pub fn rotate(&mut self, name: &SecretName, value: SecretValue) -> Result<(), VaultError> {
        let e = self.entry(name)?;
        e.value = Locked::new(value);
        Ok(())
    }

    /// New hosts for `name`.
    pub fn set_hosts(&mut self, name: &SecretName, hosts: Vec<SecretHost>) -> Result<(), VaultError> {
        let e = self.entry(name)?;
        let mut spec = e.spec.clone();
        spec.hosts = hosts;
        spec.check()?;
        e.spec = spec;
        Ok(())
    }

    /// Forgets `name` (its value is wiped).
    pub fn remove(&mut self, name: &SecretName) -> Result<(), VaultError> {
        let before = self.entries.len();
        self.entries.retain(|e| e.spec.name != *name);
        if self.entries.len() == before {
            return Err(VaultError::Unknown(name.to_string()));
        }
        Ok(())
    }

    /// The secrets without their values.
    pub fn describe(&self) -> Vec<SecretInfo> {
        self.entries
            .iter()
            .map(|e| SecretInfo {
                name: e.spec.name.clone(),
                placeholder: e.spec.placeholder.clone(),
                hosts: e.spec.hosts.clone(),
                scope: e.spec.scope.clone(),
                on_violation: e.spec.on_violation,
                locked: e.value.is_locked(),
            })
            .collect()
    }

    /// Whether every value's pages are locked.
    pub fn all_locked(&self) -> bool {
        self.entries.iter().all(|e| e.value.is_locked())
    }

    /// The mask for responses from `sni`: the values of the secrets that may go there.
    pub fn mask(&self, sni: &str) -> ResponseMask {
        let sni = normalize_name(sni).unwrap_or_default();
        ResponseMask::new(self.entries.iter().filter(|e| e.spec.allows_host(&sni)).map(|e| e.value.expose()))
    }

    /// The answer for one request head on `flow`: see the crate doc for the gates.
    pub fn substitute(&self, flow: &FlowIdentity, head: RequestHead) -> Answer {
        let sni = normalize_name(&flow.sni).unwrap_or_default();
        let authority_ok = authority_names(&head.authority, &sni);
        let mut violations = Vec::new();
        let mut sensitive = Vec::new();
        let mut changed = false;
        let RequestHead { method, mut target, authority, mut headers } = head;
        for e in &self.entries {
            let ph = e.spec.placeholder.as_str().as_bytes();
            // Why this secret may not go into this request at all, if it may not.
            let refused: Option<String> = if sni.is_empty() || !e.spec.allows_host(&sni) {
                Some(format!("{} is not one of its hosts", if sni.is_empty() { "(no name)" } else { &sni }))
            } else if !flow.pinned {
                Some(format!("the destination address was not resolved for {sni} through the gateway"))
            } else if !flow.verified {
                Some(format!("the upstream certificate was not verified for {sni}"))
            } else if !authority_ok {
                Some(format!("the request names {authority:?}, not {sni}"))
            } else {
                None
            };
            let mut violate = |location: Location, why: String| {
                violations.push(Violation { secret: e.spec.name.clone(), location, why, action: e.spec.on_violation });
            };
            for (name, value) in headers.iter_mut() {
                let lname = name.to_ascii_lowercase();
                if lname == "host" || lname.starts_with(':') {
                    if contains(value, ph) {
                        violate(Location::Header, format!("in {lname}, which is never substituted"));
                    }
                    continue;
                }
                let in_scope = e.spec.scope.headers.allows(&lname);
                if contains(value, ph) {
                    match (&refused, in_scope) {
                        (None, true) => {
                            *value = replace_all(value, ph, e.value.expose());
                            changed = true;
                            if !sensitive.contains(&lname) {
                                sensitive.push(lname.clone());
                            }
                        }
                        (Some(why), _) => violate(Location::Header, format!("in {lname}: {why}")),
                        (None, false) => violate(Location::Header, format!("{lname} is not in its header scope")),
                    }
                } else if lname == "authorization" {
                    if let Some(decoded) = basic_credentials(value).filter(|d| contains(d, ph)) {
                        match (&refused, in_scope) {
                            (None, true) => {
                                let replaced = replace_all(&decoded, ph, e.value.expose());
                                let mut v = Zeroizing::new(b"Basic ".to_vec());
                                v.extend_from_slice(
                                    base64::engine::general_purpose::STANDARD.encode(&*replaced).as_bytes(),
                                );
                                *value = v;
                                changed = true;
                                if !sensitive.contains(&lname) {
                                    sensitive.push(lname.clone());
                                }
                            }
                            (Some(why), _) => violate(Location::Header, format!("in Basic credentials: {why}")),
                            (None, false) => {
                                violate(Location::Header, "authorization is not in its header scope".into())
                            }
                        }
                    }
                }
            }
            let q = target.iter().position(|&b| b == b'?').unwrap_or(target.len());
            if contains(&target[..q], ph) {
                violate(Location::Path, "the path is never substituted".into());
            }
            if contains(&target[q..], ph) {
                match &refused {
                    None if e.spec.scope.query => {
                        let mut t = Zeroizing::new(target[..q].to_vec());
                        t.extend_from_slice(&replace_all(&target[q..], ph, e.value.expose()));
                        target = t;
                        changed = true;
                    }
                    None => violate(Location::Query, "query substitution is off for it".into()),
                    Some(why) => violate(Location::Query, why.clone()),
                }
            }
        }
        let refuse = violations.iter().any(|v| v.action != OnViolation::Forward);
        let stop = violations.iter().any(|v| v.action == OnViolation::Stop);
        let rewritten = (changed && !refuse).then_some(RequestHead { method, target, authority, headers });
        Answer {
            rewritten,
            sensitive: if refuse { Vec::new() } else { sensitive },
            violations,
            refuse,
            stop,
            mask: self.mask(&sni),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(hay.len() + with.len()));
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// The decoded credentials of an `Authorization: Basic …` value.
fn basic_credentials(value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let v = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok().map(Zeroizing::new)
}

#[cfg(test)]
mod tests;
