//! Length-prefixed framing with a hard payload bound.

use serde::Serialize;

/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = 256 * 1024;
/// Bytes of the length header.
pub const HEADER_LEN: usize = 4;

/// Why a frame was rejected. Every variant closes the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not decode as a protocol message: {0}")]
    Malformed(String),
    #[error("channel closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Encodes `msg` as one frame (header plus payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    let mut buf =
        postcard::to_extend(msg, std::mem::take(&mut buf)).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
    }
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Splits a byte stream into frame payloads. Holds at most one partial frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Payload being collected, with its announced length.
    payload: Option<(usize, Vec<u8>)>,
    failed: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds stream bytes; calls `on_frame` with each complete payload, in order.
    /// After an error the decoder refuses all further input.
    pub fn feed(&mut self, mut data: &[u8], on_frame: &mut dyn FnMut(Vec<u8>)) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Malformed("decoder already failed".into()));
        }
        while !data.is_empty() {
            match &mut self.payload {
                None => {
                    let take = (HEADER_LEN - self.header_len).min(data.len());
                    self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                    self.header_len += take;
                    data = &data[take..];
                    if self.header_len == HEADER_LEN {
                        let len = u32::from_le_bytes(self.header) as usize;
                        self.header_len = 0;
                        if len > MAX_FRAME {
                            self.failed = true;
                            return Err(FrameError::TooLarge { len, max: MAX_FRAME });
                        }
                        self.payload = Some((len, Vec::with_capacity(len)));
                    }
                }
                Some((len, buf)) => {
                    let take = (*len - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                }
            }
            if let Some((len, buf)) = &self.payload {
                if buf.len() == *len {
                    let (_, buf) = self.payload.take().expect("checked above");
                    on_frame(buf);
                }
            }
        }
        Ok(())
    }

    /// Call at end of stream: an unfinished frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        let buffered = self.header_len + self.payload.as_ref().map_or(0, |(_, b)| HEADER_LEN + b.len());
        if buffered == 0 {
            Ok(())
        } else {
            Err(FrameError::Truncated { buffered })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut s = Vec::new();
        for p in payloads {
            s.extend_from_slice(&(p.len() as u32).to_le_bytes());
            s.extend_from_slice(p);
        }
        s
    }

    #[test]
    fn oversized_header_is_rejected_before_buffering() {
        let mut d = FrameDecoder::new();
        let hdr = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let err = d.feed(&hdr, &mut |_| panic!("no frame")).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: MAX_FRAME + 1, max: MAX_FRAME });
        assert!(d.feed(&[0], &mut |_| {}).is_err(), "a failed decoder stays failed");
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut d = FrameDecoder::new();
        let s = frames(&[vec![1, 2, 3]]);
        d.feed(&s[..5], &mut |_| panic!("incomplete")).unwrap();
        assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: 5 }));
        let mut d = FrameDecoder::new();
        d.feed(&s, &mut |_| {}).unwrap();
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn max_frame_is_accepted_and_encode_refuses_more() {
        let p = vec![9u8; MAX_FRAME];
        let mut d = FrameDecoder::new();
        let mut got = 0;
        d.feed(&frames(&[p]), &mut |f| got = f.len()).unwrap();
        assert_eq!(got, MAX_FRAME);
        let too_big = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(encode(&too_big), Err(FrameError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_frames(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let stream = frames(&payloads);
            let mut d = FrameDecoder::new();
            let mut out = Vec::new();
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                d.feed(&rest[..n], &mut |f| out.push(f)).unwrap();
                rest = &rest[n..];
                i += 1;
            }
            prop_assert_eq!(out, payloads);
            prop_assert!(d.finish().is_ok());
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = FrameDecoder::new();
            let _ = d.feed(&data, &mut |f| { let _ = crate::decode::<crate::GuestMsg>(&f); });
        }
    }
}
