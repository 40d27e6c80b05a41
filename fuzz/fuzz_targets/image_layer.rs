//! An image layer as a registry could send it: the bytes of a (compressed or plain) tar,
//! merged into the root filesystem's tar under small limits. Nothing panics or outgrows the
//! limits; every entry name the sanitizer keeps is relative, without `..` or NUL.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use msb_images::oci::Digest;
use msb_images::rootfs::{merge_within, normalize, Layer};

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = normalize(data) {
        assert!(!name.starts_with('/'), "{name:?}");
        assert!(!name.contains('\0'), "{name:?}");
        assert!(name.split('/').all(|c| c != ".." && c != "." && !c.is_empty()) || name.is_empty(), "{name:?}");
    }
    let mut blob = tempfile::NamedTempFile::new().expect("a temporary file");
    blob.write_all(data).expect("written");
    let layer = Layer { blob: blob.path().to_path_buf(), digest: Digest::of(data), diff_id: Digest::of(data) };
    let mut out = Vec::new();
    if let Ok(stats) = merge_within(&[layer], &mut out, 256, 1 << 20) {
        assert!(stats.entries <= 256 && stats.bytes <= 1 << 20, "{stats:?}");
    }
});
