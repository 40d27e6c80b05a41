//! Builders of hostile inputs for tests (here and in other crates' tests): nothing in msb
//! itself uses them.

/// A zstd frame of raw and RLE blocks (Window_Log 17, so blocks of up to 128 KiB): each
/// `(rle, data, n)` is `data` stored raw, or its first byte repeated `n` times. A few bytes
/// of blob make 128 KiB of output, which is how a decompression bomb is built.
pub fn zstd_blocks(blocks: &[(bool, &[u8], usize)]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
    for (i, &(rle, data, n)) in blocks.iter().enumerate() {
        let last = u32::from(i + 1 == blocks.len());
        let (kind, size) = if rle { (1u32, n as u32) } else { (0u32, data.len() as u32) };
        let h = last | (kind << 1) | (size << 3);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
        out.extend_from_slice(if rle { &data[..1] } else { data });
    }
    out
}

/// A tar stream of one GNU long-name member announcing `n` bytes of name (the name itself
/// `a` repeated), compressed as [`zstd_blocks`]: about 3 bytes of blob per 128 KiB of name.
pub fn zstd_long_name(n: usize) -> Vec<u8> {
    let mut l = tar::Header::new_gnu();
    if let Some(g) = l.as_gnu_mut() {
        g.name[..13].copy_from_slice(b"././@LongLink");
    }
    l.set_entry_type(tar::EntryType::GNULongName);
    l.set_size(n as u64);
    l.set_mode(0o644);
    l.set_cksum();
    let mut blocks: Vec<(bool, &[u8], usize)> = vec![(false, l.as_bytes(), 0)];
    for _ in 0..n / (128 << 10) {
        blocks.push((true, b"a", 128 << 10));
    }
    blocks.push((true, &[0u8], 1024));
    zstd_blocks(&blocks)
}
