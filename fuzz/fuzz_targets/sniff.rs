//! The first bytes of a guest's TCP flow: the TLS ClientHello's server name and ALPN, the
//! HTTP/1 Host. Nothing panics, whatever the record layer says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_net_gateway::sniff::{client_alpn, sniff};

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
    let _ = client_alpn(data);
    // Every prefix is a flow whose rest has not come yet.
    for cut in [1, 5, 9, 43, data.len() / 2] {
        if cut < data.len() {
            let _ = sniff(&data[..cut]);
        }
    }
});
