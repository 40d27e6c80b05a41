//! The gateway's DNS: a guest's query under a policy, and upstream's answer to it filtered
//! and pinned. Nothing panics; an answer the guest gets is a DNS message with the query's id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_net_gateway::classify::Classifier;
use msb_net_gateway::dns::{answer, on_query, Pins, Step};
use msb_net_gateway::policy::Policy;

fuzz_target!(|data: &[u8]| {
    // A query, then (after its length in the first two bytes) upstream's bytes.
    if data.len() < 2 {
        return;
    }
    let qlen = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (query, upstream) = data[2..].split_at(qlen);
    let policies = [Policy::default(), Policy::parse("allow any\ndefault allow").expect("valid")];
    for policy in &policies {
        match on_query(policy, query) {
            Step::Answer { bytes, .. } => assert!(bytes.len() >= 12, "an answer has a header"),
            Step::Resolve(q) => {
                let id = 0x4242;
                let _ = q.upstream(id);
                let mut pins = Pins::default();
                let classifier = Classifier::new([]);
                let (bytes, _) = answer(&q, upstream, id, policy, &classifier, &mut pins, 1_000);
                assert!(bytes.len() >= 12, "an answer has a header");
                assert_eq!(u16::from_be_bytes([bytes[0], bytes[1]]), q.id, "the guest's id");
            }
        }
    }
});
