//! Secrets on the client side: the `--secret` syntax, placeholders made at create, values
//! resolved at every start from their source, and the frame that carries them to the
//! sandbox process over its launch pipe.
//!
//! Invariants: a value is never put in the record, argv, the environment of the sandbox
//! process, a log or an error message (errors name the secret and the source, never the
//! value); inline values are refused; the frame is bounded ([`MAX_SECRETS`] values of at
//! most [`MAX_SECRET_VALUE`] bytes).

use std::io::{Read, Write};
use std::path::PathBuf;

use msb_schema::secret::{
    HeaderScope, OnViolation, Placeholder, SecretHost, SecretName, SecretScope, SecretSource, SecretSpec, SecretValue,
    MAX_SECRETS, MAX_SECRET_VALUE, PLACEHOLDER_RANDOM,
};

use crate::{Error, Result};

/// 26 random bytes for a placeholder, from the kernel.
pub fn random_placeholder() -> Result<Placeholder> {
    let mut b = [0u8; PLACEHOLDER_RANDOM];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::Config(format!("reading /dev/urandom for a secret's placeholder: {e}")))?;
    Ok(Placeholder::generated(&b))
}

/// Parses one `--secret`: `NAME@HOST[,HOST…]` (the value from msb's own environment
/// variable `NAME`), or the long form `name=NAME,host=H[,host=H…][,env=VAR|file=PATH]
/// [,headers=H1+H2|all|none][,query][,placeholder=P][,on-violation=forward|block|stop]`.
pub fn parse_secret(s: &str) -> Result<SecretSpec> {
    let bad = |m: String| Error::Config(format!("--secret {s:?}: {m}"));
    let inline = || {
        bad("inline values are refused (they would land in shell history and `ps`): put the value in an \
             environment variable (`--secret NAME@HOST`, or `env=VAR`) or a file (`file=PATH`)"
            .into())
    };
    if !s.starts_with("name=") {
        let (name, hosts) = s.split_once('@').ok_or_else(|| bad("use NAME@HOST[,HOST…] or name=…,host=…".into()))?;
        if name.contains('=') || name.contains(':') {
            return Err(inline());
        }
        let name = SecretName::new(name).map_err(|e| bad(e.to_string()))?;
        let hosts = hosts.split(',').map(SecretHost::parse).collect::<std::result::Result<Vec<_>, _>>();
        let spec = SecretSpec {
            source: SecretSource::Env(name.to_string()),
            name,
            placeholder: random_placeholder()?,
            hosts: hosts.map_err(|e| bad(e.to_string()))?,
            scope: SecretScope::default(),
            on_violation: OnViolation::Forward,
        };
        spec.check().map_err(|e| bad(e.to_string()))?;
        return Ok(spec);
    }
    let (mut name, mut hosts, mut source, mut placeholder) = (None, Vec::new(), None, None);
    let (mut scope, mut on_violation) = (SecretScope::default(), OnViolation::Forward);
    for part in s.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match (k, v) {
            ("name", v) => name = Some(SecretName::new(v).map_err(|e| bad(e.to_string()))?),
            ("host", v) => hosts.push(SecretHost::parse(v).map_err(|e| bad(e.to_string()))?),
            ("env", v) if !v.is_empty() => source = Some(SecretSource::Env(v.to_string())),
            ("file", v) if !v.is_empty() => {
                let p = std::path::absolute(v).unwrap_or_else(|_| PathBuf::from(v));
                source = Some(SecretSource::File(p));
            }
            ("value", _) => return Err(inline()),
            ("headers", "all") => scope.headers = HeaderScope::All,
            ("headers", "none") => scope.headers = HeaderScope::None,
            ("headers", v) => {
                let names: Vec<&str> = v.split('+').collect();
                scope.headers = HeaderScope::only(&names).map_err(|e| bad(e.to_string()))?;
            }
            ("query", "") => scope.query = true,
            ("body", _) => {
                return Err(bad("body substitution is not offered: values go into request headers or, with \
                                `query`, the query string"
                    .into()))
            }
            ("placeholder", v) => placeholder = Some(Placeholder::custom(v).map_err(|e| bad(e.to_string()))?),
            ("on-violation", v) => on_violation = v.parse().map_err(bad)?,
            _ => {
                return Err(bad(format!(
                    "unknown part {part:?}: use name=, host=, env=, file=, headers=, query, placeholder=, on-violation="
                )))
            }
        }
    }
    let name = name.ok_or_else(|| bad("name=NAME is missing".into()))?;
    let spec = SecretSpec {
        source: source.unwrap_or_else(|| SecretSource::Env(name.to_string())),
        name,
        placeholder: match placeholder {
            Some(p) => p,
            None => random_placeholder()?,
        },
        hosts,
        scope,
        on_violation,
    };
    spec.check().map_err(|e| bad(e.to_string()))?;
    Ok(spec)
}

/// Reads `spec`'s value from its source (an environment variable of this process, or a
/// file with one trailing newline stripped). `given` holds values an API caller passed.
pub fn resolve(spec: &SecretSpec, given: &mut Vec<(SecretName, SecretValue)>) -> Result<SecretValue> {
    let name = spec.name.as_str();
    let checked = |r: std::result::Result<SecretValue, msb_schema::secret::SecretError>| {
        r.map_err(|e| Error::Config(e.to_string()))
    };
    if let Some(i) = given.iter().position(|(n, _)| *n == spec.name) {
        return Ok(given.swap_remove(i).1);
    }
    match &spec.source {
        SecretSource::Env(var) => {
            let v = std::env::var_os(var).ok_or_else(|| {
                Error::Config(format!(
                    "secret {name}: the environment variable {var} is not set (the value is read from it at every start)"
                ))
            })?;
            checked(SecretValue::new(name, std::os::unix::ffi::OsStringExt::into_vec(v)))
        }
        SecretSource::File(p) => {
            let meta =
                std::fs::metadata(p).map_err(|e| Error::Config(format!("secret {name}: {}: {e}", p.display())))?;
            if meta.len() > MAX_SECRET_VALUE as u64 + 2 {
                return Err(Error::Config(format!(
                    "secret {name}: {} is larger than {MAX_SECRET_VALUE} bytes",
                    p.display()
                )));
            }
            let bytes = std::fs::read(p).map_err(|e| Error::Config(format!("secret {name}: {}: {e}", p.display())))?;
            checked(SecretValue::from_file_bytes(name, bytes))
        }
        SecretSource::Given => Err(Error::Config(format!(
            "secret {name} was given by an API caller and is not stored: pass its value again to start the sandbox"
        ))),
    }
}

/// Writes the values frame: a count, then each name and value with their lengths.
pub fn write_frame(w: &mut impl Write, values: &[(SecretName, SecretValue)]) -> std::io::Result<()> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    buf.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for (n, v) in values {
        buf.extend_from_slice(&(n.as_str().len() as u16).to_le_bytes());
        buf.extend_from_slice(n.as_str().as_bytes());
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        buf.extend_from_slice(v.expose());
    }
    w.write_all(&buf)?;
    w.flush()
}

/// Reads a values frame (bounded) into checked values.
pub fn read_frame(r: &mut impl Read) -> std::result::Result<Vec<(SecretName, SecretValue)>, String> {
    let mut u32b = [0u8; 4];
    r.read_exact(&mut u32b).map_err(|e| format!("reading the secrets frame: {e}"))?;
    let count = u32::from_le_bytes(u32b) as usize;
    if count > MAX_SECRETS {
        return Err(format!("the secrets frame holds {count} values, more than {MAX_SECRETS}"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut u16b = [0u8; 2];
        r.read_exact(&mut u16b).map_err(|e| e.to_string())?;
        let n = u16::from_le_bytes(u16b) as usize;
        if n > 64 {
            return Err("a secret name in the frame is too long".into());
        }
        let mut name = vec![0u8; n];
        r.read_exact(&mut name).map_err(|e| e.to_string())?;
        let name = SecretName::new(&String::from_utf8_lossy(&name)).map_err(|e| e.to_string())?;
        r.read_exact(&mut u32b).map_err(|e| e.to_string())?;
        let len = u32::from_le_bytes(u32b) as usize;
        if len > MAX_SECRET_VALUE {
            return Err(format!("secret {name}: the value is longer than {MAX_SECRET_VALUE} bytes"));
        }
        let mut value = vec![0u8; len];
        r.read_exact(&mut value).map_err(|e| e.to_string())?;
        let value = SecretValue::new(name.as_str(), value).map_err(|e| e.to_string())?;
        out.push((name, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_and_long_forms_parse_and_inline_values_are_refused() {
        let s = parse_secret("API_KEY@api.example.com,*.corp.example").unwrap();
        assert_eq!(s.name.as_str(), "API_KEY");
        assert_eq!(s.source, SecretSource::Env("API_KEY".into()));
        assert_eq!(s.hosts.len(), 2);
        assert!(s.placeholder.as_str().starts_with("msbph_"));
        let l = parse_secret("name=TOKEN,host=api.test,file=/run/tok,headers=Authorization,query,on-violation=block")
            .unwrap();
        assert_eq!(l.source, SecretSource::File("/run/tok".into()));
        assert_eq!(l.scope, SecretScope { headers: HeaderScope::Only(vec!["authorization".into()]), query: true });
        assert_eq!(l.on_violation, OnViolation::Block);
        for bad in [
            "API_KEY=sk-123@api.test",
            "name=A,host=api.test,value=sk",
            "name=A,host=api.test,body",
            "A@1.2.3.4",
            "name=A",
            "A",
            "name=A,host=a.test,headers=none",
            "name=A,host=a.test,what",
        ] {
            let e = parse_secret(bad).unwrap_err().to_string();
            assert!(!e.contains("sk-123") || e.contains("inline"), "{e}");
            assert!(parse_secret(bad).is_err(), "{bad}");
        }
        assert!(parse_secret("API_KEY=sk-123@api.test").unwrap_err().to_string().contains("inline values are refused"));
    }

    #[test]
    fn the_values_frame_round_trips_and_is_bounded() {
        let v = vec![
            (SecretName::new("A").unwrap(), SecretValue::new("A", b"one".to_vec()).unwrap()),
            (SecretName::new("B").unwrap(), SecretValue::new("B", b"two-two".to_vec()).unwrap()),
        ];
        let mut buf = Vec::new();
        write_frame(&mut buf, &v).unwrap();
        let back = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].1.expose(), b"two-two");
        let mut big = (MAX_SECRETS as u32 + 1).to_le_bytes().to_vec();
        big.extend([0; 16]);
        assert!(read_frame(&mut big.as_slice()).is_err());
        let mut cr = 1u32.to_le_bytes().to_vec();
        cr.extend(1u16.to_le_bytes());
        cr.push(b'A');
        cr.extend(3u32.to_le_bytes());
        cr.extend(b"a\rb");
        assert!(read_frame(&mut cr.as_slice()).unwrap_err().contains("carriage return"));
    }

    #[test]
    fn a_file_value_loses_one_newline_and_an_unset_variable_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, "sk-file-value\n").unwrap();
        let spec = parse_secret(&format!("name=TOK,host=api.test,file={}", f.display())).unwrap();
        assert_eq!(resolve(&spec, &mut Vec::new()).unwrap().expose(), b"sk-file-value");
        let spec = parse_secret("MSB_TEST_SURELY_UNSET_VAR@api.test").unwrap();
        let e = resolve(&spec, &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("MSB_TEST_SURELY_UNSET_VAR") && e.contains("not set"), "{e}");
    }
}
