use super::*;
use msb_schema::secret::{HeaderScope, Placeholder, SecretScope, SecretSource};
use proptest::prelude::*;

const VALUE: &[u8] = b"sk-live-REALVALUE-0123456789";

fn ph() -> Placeholder {
    Placeholder::generated(&[3; 26])
}

fn spec(hosts: &[&str], scope: SecretScope, on: OnViolation) -> SecretSpec {
    SecretSpec {
        name: SecretName::new("API_KEY").unwrap(),
        placeholder: ph(),
        hosts: hosts.iter().map(|h| SecretHost::parse(h).unwrap()).collect(),
        scope,
        on_violation: on,
        source: SecretSource::Given,
    }
}

fn vault(hosts: &[&str], scope: SecretScope) -> Vault {
    Vault::new(vec![(spec(hosts, scope, OnViolation::Forward), SecretValue::new("API_KEY", VALUE.to_vec()).unwrap())])
        .unwrap()
}

fn head(authority: &str, target: &str, headers: &[(&str, String)]) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        target: Zeroizing::new(target.as_bytes().to_vec()),
        authority: authority.into(),
        headers: headers.iter().map(|(n, v)| (n.to_string(), Zeroizing::new(v.clone().into_bytes()))).collect(),
    }
}

fn flow(sni: &str, pinned: bool, verified: bool) -> FlowIdentity {
    FlowIdentity { sni: sni.into(), pinned, verified }
}

/// Every byte the answer would send upstream.
fn sent(original: &RequestHead, a: &Answer) -> Vec<u8> {
    let h = a.rewritten.as_ref().unwrap_or(original);
    let mut out = h.target.to_vec();
    for (n, v) in &h.headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn has_value(b: &[u8]) -> bool {
    b.windows(VALUE.len()).any(|w| w == VALUE)
}

fn clone_head(h: &RequestHead) -> RequestHead {
    RequestHead {
        method: h.method.clone(),
        target: h.target.clone(),
        authority: h.authority.clone(),
        headers: h.headers.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
    }
}

#[test]
fn host_relations_decide_substitution() {
    // (secret host, sni, authority, substituted?)
    let cases = [
        ("api.test", "api.test", "api.test", true),
        ("api.test", "API.test", "api.test:443", true),
        ("api.test", "api.test.", "Api.Test", true),
        ("api.test", "api.test", "api.test:8443", true),
        ("api.test", "x.api.test", "x.api.test", false),
        ("api.test", "other.test", "other.test", false),
        ("api.test", "test", "test", false),
        ("*.api.test", "x.api.test", "x.api.test", true),
        ("*.api.test", "a.b.api.test", "a.b.api.test", true),
        ("*.api.test", "api.test", "api.test", false),
        ("*.api.test", "xapi.test", "xapi.test", false),
        ("api.test", "", "api.test", false),
        ("api.test", "192.0.2.1", "192.0.2.1", false),
        ("api.test", "api.test", "other.test", false),
        ("api.test", "api.test", "api.test:", false),
        ("api.test", "api.test", "api.test:x", false),
        ("api.test", "api.test", "", false),
    ];
    for (host, sni, authority, want) in cases {
        let v = vault(&[host], SecretScope::default());
        let h = head(authority, "/v1", &[("Authorization", format!("Bearer {}", ph()))]);
        let a = v.substitute(&flow(sni, true, true), clone_head(&h));
        assert_eq!(has_value(&sent(&h, &a)), want, "{host} {sni} {authority}");
        assert_eq!(a.violations.is_empty(), want, "{host} {sni} {authority}: {:?}", a.violations);
    }
}

#[test]
fn each_gate_and_location_is_needed() {
    let p = ph().to_string();
    // (pinned, verified, scope, header name, target, substituted?)
    let only_auth = SecretScope { headers: HeaderScope::only(&["Authorization"]).unwrap(), query: false };
    let with_query = SecretScope { headers: HeaderScope::All, query: true };
    let cases: Vec<(bool, bool, SecretScope, &str, String, bool)> = vec![
        (true, true, SecretScope::default(), "X-Api-Key", "/".into(), true),
        (false, true, SecretScope::default(), "X-Api-Key", "/".into(), false),
        (true, false, SecretScope::default(), "X-Api-Key", "/".into(), false),
        (true, true, only_auth.clone(), "X-Api-Key", "/".into(), false),
        (true, true, only_auth.clone(), "authorization", "/".into(), true),
        (true, true, SecretScope::default(), "Host", "/".into(), false),
        (true, true, SecretScope::default(), "x", format!("/{p}/x"), false),
        (true, true, SecretScope::default(), "x", format!("/x?key={p}"), false),
        (true, true, with_query.clone(), "x", format!("/x?key={p}"), true),
        (true, true, with_query, "x", format!("/{p}?a=b"), false),
    ];
    for (pinned, verified, scope, name, target, want) in cases {
        let v = vault(&["api.test"], scope.clone());
        let value = if target.contains(&p) { "plain".to_string() } else { format!("Bearer {p}") };
        let h = head("api.test", &target, &[(name, value)]);
        let a = v.substitute(&flow("api.test", pinned, verified), clone_head(&h));
        assert_eq!(has_value(&sent(&h, &a)), want, "{pinned} {verified} {scope:?} {name} {target}");
        if !want {
            assert!(!a.violations.is_empty(), "a misplaced placeholder is reported");
        }
    }
}

#[test]
fn basic_credentials_are_decoded_and_encoded_again() {
    let v = vault(&["api.test"], SecretScope::default());
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("user:{}", ph()));
    let h = head("api.test", "/", &[("Authorization", format!("Basic {creds}"))]);
    let a = v.substitute(&flow("api.test", true, true), clone_head(&h));
    let out = a.rewritten.expect("substituted");
    let value = std::str::from_utf8(&out.headers[0].1).unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.strip_prefix("Basic ").unwrap()).unwrap();
    assert_eq!(decoded, [b"user:".as_slice(), VALUE].concat());
    assert_eq!(a.sensitive, vec!["authorization".to_string()]);
    // To another host: untouched, reported.
    let a = v.substitute(
        &flow("other.test", true, true),
        head("other.test", "/", &[("Authorization", format!("Basic {creds}"))]),
    );
    assert!(a.rewritten.is_none() && a.violations.len() == 1);
}

#[test]
fn block_and_stop_refuse_the_request() {
    for (on, stop) in [(OnViolation::Block, false), (OnViolation::Stop, true)] {
        let v = Vault::new(vec![(
            spec(&["api.test"], SecretScope::default(), on),
            SecretValue::new("A", VALUE.to_vec()).unwrap(),
        )])
        .unwrap();
        let a = v.substitute(&flow("evil.test", true, true), head("evil.test", "/", &[("X", ph().to_string())]));
        assert!(a.refuse && a.rewritten.is_none());
        assert_eq!(a.stop, stop);
    }
}

#[test]
fn rotation_removal_and_hosts_apply_to_the_next_request() {
    let mut v = vault(&["api.test"], SecretScope::default());
    let name = SecretName::new("API_KEY").unwrap();
    let h = || head("api.test", "/", &[("X-Key", ph().to_string())]);
    let f = flow("api.test", true, true);
    v.rotate(&name, SecretValue::new("API_KEY", b"rotated-value-000".to_vec()).unwrap()).unwrap();
    let a = v.substitute(&f, h());
    assert_eq!(&*a.rewritten.unwrap().headers[0].1, b"rotated-value-000");
    v.set_hosts(&name, vec![SecretHost::parse("other.test").unwrap()]).unwrap();
    assert!(v.substitute(&f, h()).rewritten.is_none());
    v.set_hosts(&name, vec![SecretHost::parse("api.test").unwrap()]).unwrap();
    v.remove(&name).unwrap();
    let a = v.substitute(&f, h());
    assert!(a.rewritten.is_none() && a.violations.is_empty(), "a removed secret's placeholder is just text");
    assert!(v.remove(&name).is_err());
    assert!(v.describe().is_empty());
}

#[test]
fn the_mask_names_only_the_hosts_values() {
    let v = vault(&["api.test"], SecretScope::default());
    assert!(!v.mask("api.test").is_empty());
    assert!(v.mask("other.test").is_empty());
    let info = v.describe();
    assert_eq!(info.len(), 1);
    assert!(!format!("{info:?}").contains("REALVALUE"));
}

proptest! {
    /// An output holds the value only when every gate holds.
    #[test]
    fn a_value_goes_out_only_when_every_gate_holds(
        host_ok in any::<bool>(), pinned in any::<bool>(), verified in any::<bool>(),
        authority_ok in any::<bool>(), header_in_scope in any::<bool>(), query_on in any::<bool>(),
        in_query in any::<bool>(), in_path in any::<bool>(), basic in any::<bool>(),
    ) {
        let scope = SecretScope {
            headers: if header_in_scope { HeaderScope::All } else { HeaderScope::only(&["x-other"]).unwrap() },
            query: query_on,
        };
        let v = vault(&["api.test"], scope);
        let p = ph().to_string();
        let sni = if host_ok { "api.test" } else { "evil.test" };
        let authority = if authority_ok { sni } else { "third.test" };
        let target = format!("/{}?{}", if in_path { p.as_str() } else { "p" }, if in_query { p.as_str() } else { "q" });
        let hv = if basic {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("u:{p}")))
        } else {
            format!("Bearer {p}")
        };
        let h = head(authority, &target, &[("Authorization", hv)]);
        let a = v.substitute(&flow(sni, pinned, verified), clone_head(&h));
        let out = sent(&h, &a);
        let gates = host_ok && pinned && verified && authority_ok;
        let decoded_value = a.rewritten.as_ref().is_some_and(|r| {
            let v = std::str::from_utf8(&r.headers[0].1).unwrap_or("");
            v.strip_prefix("Basic ").and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()).is_some_and(|d| has_value(&d))
        });
        let any_value = has_value(&out) || decoded_value;
        prop_assert_eq!(any_value, gates && (header_in_scope || (query_on && in_query)));
        // The path never.
        let t = a.rewritten.as_ref().map_or(&h.target, |r| &r.target);
        let q = t.iter().position(|&b| b == b'?').unwrap();
        prop_assert!(!has_value(&t[..q]));
    }
}
