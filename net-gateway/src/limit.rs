//! Per-sandbox rate limits: new flows per second (TCP and UDP together) and, optionally,
//! bytes per second each way. All are token buckets refilled from the gateway's clock.
//!
//! Invariants: a bucket never holds more than its burst and never goes below zero; a byte
//! limit never drops TCP data, it only delays it (the guest's TCP window closes, the host
//! side's bytes stay parked); UDP datagrams over the limit are dropped whole, as a policer
//! does; a flow limit refuses the new flow (RST / ICMP) as any other bound does.

use std::fmt;

use crate::stack::{SYN_BURST, SYN_PER_SEC};

/// The least a byte bucket lets through at once once it is starved (one full frame), so a
/// slow limit moves data in frames rather than in single bytes.
const MIN_GRANT: u64 = 1500;

/// A sandbox's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// New flows per second, sustained.
    pub flows_per_sec: u32,
    /// New flows allowed at once after a quiet spell.
    pub flow_burst: u32,
    /// Bytes per second the guest may send out (all flows together); `None`: unlimited.
    pub egress_bytes_per_sec: Option<u64>,
    /// Bytes per second the guest may receive (all flows together); `None`: unlimited.
    pub ingress_bytes_per_sec: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            flows_per_sec: SYN_PER_SEC,
            flow_burst: SYN_BURST,
            egress_bytes_per_sec: None,
            ingress_bytes_per_sec: None,
        }
    }
}

/// Why a [`Limits`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the new-flow rate must be at least 1 per second (got 0)")]
    NoFlows,
    #[error("a byte rate must be at least {MIN_GRANT} bytes per second (got {0}): a slower link cannot carry one frame a second")]
    TooSlow(u64),
}

impl Limits {
    /// Checks the limits can carry traffic at all.
    pub fn check(&self) -> Result<(), LimitError> {
        if self.flows_per_sec == 0 || self.flow_burst == 0 {
            return Err(LimitError::NoFlows);
        }
        for r in [self.egress_bytes_per_sec, self.ingress_bytes_per_sec].into_iter().flatten() {
            if r < MIN_GRANT {
                return Err(LimitError::TooSlow(r));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |r: Option<u64>| r.map_or("unlimited".to_string(), |r| format!("{r} B/s"));
        write!(
            f,
            "{} new flows/s (burst {}), out {}, in {}",
            self.flows_per_sec,
            self.flow_burst,
            rate(self.egress_bytes_per_sec),
            rate(self.ingress_bytes_per_sec)
        )
    }
}

/// Parses a byte rate: a number of bytes per second with an optional suffix, `k`/`M`/`G`
/// (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), and an optional `/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("{s:?} is not a byte rate; write e.g. 500k, 10M or 4MiB (per second)"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1000,
        "M" | "MB" => 1000 * 1000,
        "G" | "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => return Err(format!("{s:?}: unknown unit {u:?}; use k, M, G (1000s) or KiB, MiB, GiB (1024s)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    at_ms: u64,
    /// Someone asked for more than there was since the last [`Bucket::settle`].
    starved: bool,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now_ms: u64) -> Bucket {
        let burst = burst.max(1);
        Bucket { rate: rate.max(1), burst, tokens: burst, at_ms: now_ms, starved: false }
    }

    /// A byte bucket for `rate` bytes/s: a quarter second's worth may go at once.
    pub fn bytes(rate: u64, now_ms: u64) -> Bucket {
        Bucket::new(rate, (rate / 4).max(MIN_GRANT), now_ms)
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        let add = u128::from(elapsed) * u128::from(self.rate) / 1000;
        if add > 0 {
            self.tokens = (u128::from(self.tokens) + add).min(u128::from(self.burst)) as u64;
            self.at_ms = now_ms;
        } else if self.tokens >= self.burst {
            // Full: time spent full earns nothing.
            self.at_ms = now_ms;
        }
    }

    /// How many of `want` may go now; marks the bucket starved when that is fewer.
    pub fn room(&mut self, want: u64, now_ms: u64) -> u64 {
        self.refill(now_ms);
        let r = want.min(self.tokens);
        if r < want {
            self.starved = true;
        }
        r
    }

    /// Spends `n` tokens (at most what there is).
    pub fn take(&mut self, n: u64) {
        self.tokens -= n.min(self.tokens);
    }

    /// Takes `n` tokens if there are that many (a datagram goes whole or not at all); does
    /// not starve the bucket (nothing waits for a dropped datagram).
    pub fn try_take(&mut self, n: u64, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Takes one token if there is one.
    pub fn take_one(&mut self, now_ms: u64) -> bool {
        if self.room(1, now_ms) == 1 {
            self.take(1);
            true
        } else {
            false
        }
    }

    /// Milliseconds until a starved bucket holds a frame's worth again (`None`: not starved).
    pub fn wake_in(&self) -> Option<u64> {
        let need = MIN_GRANT.min(self.burst).saturating_sub(self.tokens);
        self.starved.then(|| (need * 1000).div_ceil(self.rate).max(1))
    }

    /// Forgets who was starved (each poll asks again).
    pub fn settle(&mut self) {
        self.starved = false;
    }
}

/// How many of `want` bytes an optional limit lets go now (all of them without one).
pub fn room(limit: &mut Option<Bucket>, want: usize, now_ms: u64) -> usize {
    limit.as_mut().map_or(want, |b| b.room(want as u64, now_ms) as usize)
}

/// Spends `n` bytes of an optional limit.
pub fn spend(limit: &mut Option<Bucket>, n: usize) {
    if let Some(b) = limit.as_mut() {
        b.take(n as u64);
    }
}

/// Whether a datagram of `n` bytes passes an optional limit (spending it if so).
pub fn admit(limit: &mut Option<Bucket>, n: usize, now_ms: u64) -> bool {
    limit.as_mut().is_none_or(|b| b.try_take(n as u64, now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_never_past_its_burst() {
        let mut b = Bucket::new(100, 10, 0);
        assert_eq!(b.room(50, 0), 10, "a new bucket is full");
        b.take(10);
        assert_eq!(b.room(50, 0), 0);
        assert!(b.wake_in().is_some(), "asking an empty bucket starves it");
        assert_eq!(b.room(50, 50), 5, "100/s for 50 ms");
        assert_eq!(b.room(50, 10_000), 10, "capped at the burst after a long quiet spell");
        b.take(1000);
        assert_eq!(b.room(1, 10_000), 0, "never below zero");
        // Time spent full earns nothing.
        let mut b = Bucket::new(100, 10, 0);
        assert_eq!(b.room(10, 5000), 10);
        b.take(10);
        assert_eq!(b.room(10, 5005), 0, "5 ms at 100/s is not one token");
        assert_eq!(b.room(10, 5010), 1);
    }

    #[test]
    fn a_byte_bucket_lets_a_frame_through_and_says_when() {
        let mut b = Bucket::bytes(10_000, 0);
        assert_eq!(b.room(1 << 20, 0), 2500, "a quarter second's worth");
        b.take(2500);
        b.settle();
        assert_eq!(b.wake_in(), None, "nobody asked since");
        assert_eq!(b.room(100, 0), 0);
        assert_eq!(b.wake_in(), Some(150), "1500 bytes at 10 kB/s");
        b.settle();
        assert!(!b.try_take(1, 0), "a datagram needs its whole size");
        assert_eq!(b.wake_in(), None, "and a dropped one waits for nothing");
        assert!(b.try_take(1000, 100), "1000 bytes after 100 ms");
        // Sustained: what goes over 10 s is the rate times the time, plus the burst.
        let (mut sent, mut now) = (0, 0);
        b = Bucket::bytes(10_000, 0);
        while now <= 10_000 {
            let r = b.room(4096, now);
            b.take(r);
            sent += r;
            now += 7;
        }
        assert!((100_000..=102_600).contains(&sent), "{sent}");
    }

    #[test]
    fn rates_parse_with_units_and_bad_ones_say_why() {
        for (s, v) in
            [("1500", 1500), ("500k", 500_000), ("10M", 10_000_000), ("4MiB", 4 << 20), ("1G/s", 1_000_000_000)]
        {
            assert_eq!(parse_rate(s), Ok(v), "{s}");
        }
        for bad in ["", "fast", "10 Mbit", "-5", "99999999999999999999G", "1.5M"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let l = Limits { egress_bytes_per_sec: Some(100), ..Limits::default() };
        assert_eq!(l.check(), Err(LimitError::TooSlow(100)));
        assert_eq!(Limits { flows_per_sec: 0, ..Limits::default() }.check(), Err(LimitError::NoFlows));
        assert_eq!(Limits::default().check(), Ok(()));
    }
}
