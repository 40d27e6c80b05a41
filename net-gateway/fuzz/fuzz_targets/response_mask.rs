//! The response mask on any bytes and any split: output length equals input length, and
//! the value never survives whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_schema::secret::ResponseMask;

fuzz_target!(|input: (Vec<u8>, Vec<u8>, u16)| {
    let (value, text, split) = input;
    // A value holding the mask byte can reappear from masked bytes beside it: not looked at.
    if value.is_empty() || value.len() > 64 || value.contains(&b'*') {
        return;
    }
    let mut m = ResponseMask::new([value.as_slice()]);
    let cut = (split as usize).min(text.len());
    let mut out = m.push(&text[..cut]);
    out.extend(m.push(&text[cut..]));
    out.extend(m.flush());
    assert_eq!(out.len(), text.len());
    assert!(!out.windows(value.len()).any(|w| w == value.as_slice()));
});
