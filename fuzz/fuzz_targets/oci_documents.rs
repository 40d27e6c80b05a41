//! A registry's (or an archive's) JSON documents: index, manifest, image config, each parsed
//! into its checked type; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_images::oci::{parse, ImageConfig, Index, Manifest};

fuzz_target!(|data: &[u8]| {
    let _ = parse::<Index>("an index", data);
    let _ = parse::<Manifest>("a manifest", data);
    if let Ok(c) = parse::<ImageConfig>("a config", data) {
        let _ = format!("{c:?}");
    }
});
