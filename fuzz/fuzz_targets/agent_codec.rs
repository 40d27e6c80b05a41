//! The agent channel as the host reads it from a guest: a byte stream split at chosen points
//! is framed, each frame decoded as the guest's message; a decoded message encodes and
//! decodes back to itself, and nothing panics, loops or grows past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_protocol::{decode, encode, FrameDecoder, GuestMsg, HostMsg};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size the stream arrives in.
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    for part in stream.chunks(chunk) {
        if d.feed(part, &mut |f| frames.push(f)).is_err() {
            break;
        }
    }
    for f in frames {
        if let Ok(m) = decode::<GuestMsg>(&f) {
            let again = encode(&m).expect("a decoded message encodes");
            let mut back = Vec::new();
            FrameDecoder::new().feed(&again, &mut |f| back.push(f)).expect("our own frame");
            assert_eq!(decode::<GuestMsg>(&back[0]).expect("our own message"), m);
        }
        // agentd's side reads the same bytes as the host's messages.
        let _ = decode::<HostMsg>(&f);
    }
});
