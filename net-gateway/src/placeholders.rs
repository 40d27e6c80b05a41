//! Placeholders seen where the gateway does not substitute them: in the clear (plain HTTP,
//! any other plaintext TCP, UDP datagrams, DNS queries). A placeholder is meaningless
//! outside an intercepted request to its secret's host, so by default it goes on and one
//! audit record says where; a secret with `on-violation=block` has the flow reset before the
//! bytes holding it go, one with `stop` stops the sandbox too.
//!
//! Invariants: the scan is one Aho-Corasick pass over the bytes about to leave plus a tail
//! of at most [`Watch::longest`]` - 1` bytes carried per flow (so a placeholder split across
//! writes is still seen); the gateway knows placeholders and names only, never values.

use aho_corasick::AhoCorasick;
use msb_schema::secret::OnViolation;

/// One placeholder to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub secret: String,
    pub placeholder: String,
    pub on_violation: OnViolation,
}

/// The placeholders of a sandbox's secrets.
#[derive(Debug, Default)]
pub struct Watch {
    ac: Option<AhoCorasick>,
    items: Vec<Watched>,
}

impl Watch {
    pub fn new(items: Vec<Watched>) -> Watch {
        let ac = (!items.is_empty())
            .then(|| AhoCorasick::new(items.iter().map(|w| w.placeholder.as_bytes())).ok())
            .flatten();
        Watch { ac, items }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The longest placeholder's length.
    pub fn longest(&self) -> usize {
        self.items.iter().map(|w| w.placeholder.len()).max().unwrap_or(0)
    }

    /// The first placeholder in `data`.
    pub fn find(&self, data: &[u8]) -> Option<&Watched> {
        let m = self.ac.as_ref()?.find(data)?;
        self.items.get(m.pattern().as_usize())
    }

    /// The first placeholder in `tail` + `data`, where `tail` is what this flow sent last
    /// (its end is kept in `tail` for the next call).
    pub fn scan(&self, tail: &mut Vec<u8>, data: &[u8]) -> Option<&Watched> {
        self.ac.as_ref()?;
        let keep = self.longest().saturating_sub(1);
        let hit = if tail.is_empty() {
            self.find(data)
        } else {
            let mut joined = std::mem::take(tail);
            joined.extend_from_slice(data);
            let hit = self.find(&joined);
            *tail = joined;
            hit
        };
        if tail.is_empty() {
            tail.extend_from_slice(&data[data.len().saturating_sub(keep)..]);
        } else {
            let cut = tail.len().saturating_sub(keep);
            tail.drain(..cut);
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_split_anywhere_is_seen_and_the_tail_stays_bounded() {
        let ph = "msbph_abcdefghijklmnopqrstuvwxyz";
        let w = Watch::new(vec![Watched {
            secret: "K".into(),
            placeholder: ph.into(),
            on_violation: OnViolation::Forward,
        }]);
        let text = format!("GET / HTTP/1.1\r\nAuthorization: Bearer {ph}\r\n\r\n");
        for split in 0..text.len() {
            let mut tail = Vec::new();
            let a = w.scan(&mut tail, &text.as_bytes()[..split]).is_some();
            let b = w.scan(&mut tail, &text.as_bytes()[split..]).is_some();
            assert!(a || b, "split at {split}");
            assert!(tail.len() < ph.len());
        }
        let mut tail = Vec::new();
        assert!(w.scan(&mut tail, b"msbph_abcdefghijklmnopqrstuvwxy_ nothing").is_none());
        assert!(Watch::new(Vec::new()).scan(&mut tail, ph.as_bytes()).is_none());
    }
}
