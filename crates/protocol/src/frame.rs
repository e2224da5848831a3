//! Length-prefixed frames.
//!
//! ```text
//! +-------------+--------------+-----------------+------------------+
//! | len: u32 LE | hlen: u32 LE | header (hlen B) | payload (rest)   |
//! +-------------+--------------+-----------------+------------------+
//!               \____________________ len bytes ____________________/
//! ```
//!
//! `len` is checked against a hard cap before a single byte of the body is
//! buffered, so a peer cannot make us allocate more than the cap.

use bytes::{Buf, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

use crate::MAX_HEADER;

/// Why a frame was rejected. Every variant is fatal for the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is too short to hold a header")]
    TooShort { len: usize },
    #[error("frame header of {hlen} bytes does not fit (frame {len} bytes, header limit {max})")]
    BadHeaderLength { hlen: usize, len: usize, max: usize },
    #[error("malformed message header: {0}")]
    Malformed(String),
}

/// One decoded frame: a header still to be deserialized and an opaque payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Bytes,
    pub payload: Bytes,
}

impl Frame {
    /// Deserialize the header as message type `T`.
    pub fn message<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        postcard::from_bytes(&self.header).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

fn encode_header<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let header = postcard::to_stdvec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if header.len() > MAX_HEADER {
        return Err(FrameError::BadHeaderLength {
            hlen: header.len(),
            len: header.len() + 4,
            max: MAX_HEADER,
        });
    }
    Ok(header)
}

/// A frame length that respects the cap and fits the `u32` prefix.
fn checked_len(len: usize, max_frame: usize) -> Result<usize, FrameError> {
    if len > max_frame || len > u32::MAX as usize {
        return Err(FrameError::TooLarge { len, max: max_frame });
    }
    Ok(len)
}

/// Encode the prefix (lengths and header) of a frame. The payload is written
/// after it by the caller, so that large payloads are never copied into a
/// second buffer.
pub fn encode_prefix<T: Serialize>(
    message: &T,
    payload_len: usize,
    max_frame: usize,
) -> Result<Vec<u8>, FrameError> {
    let header = encode_header(message)?;
    let len = checked_len(4 + header.len() + payload_len, max_frame)?;
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// Encode a whole frame into one buffer (handshake messages and tests).
pub fn encode<T: Serialize>(message: &T, payload: &[u8], max_frame: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = encode_prefix(message, payload.len(), max_frame)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Incremental decoder over a receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// How many more bytes `buf` must hold before [`decode`](Self::decode)
    /// can return a frame; validates the length prefix as soon as it is there.
    pub fn missing(&self, buf: &[u8]) -> Result<usize, FrameError> {
        if buf.len() < 4 {
            return Ok(4 - buf.len());
        }
        let len = self.check_len(buf)?;
        Ok((4 + len).saturating_sub(buf.len()))
    }

    fn check_len(&self, buf: &[u8]) -> Result<usize, FrameError> {
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if len < 4 {
            return Err(FrameError::TooShort { len });
        }
        Ok(len)
    }

    /// Take one complete frame off the front of `buf`, if there is one.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode_raw(buf)? {
            Some(body) => parse_body(body.freeze()).map(Some),
            None => Ok(None),
        }
    }

    /// Take one frame's body (everything after the length prefix) off the
    /// front of `buf`, without looking inside it: it may still be sealed.
    pub fn decode_raw(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        Ok(Some(buf.split_to(len)))
    }
}

/// Split a plaintext frame body (`hlen ‖ header ‖ payload`).
pub fn parse_body(mut body: Bytes) -> Result<Frame, FrameError> {
    let len = body.len();
    if len < 4 {
        return Err(FrameError::TooShort { len });
    }
    let hlen = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    if hlen > MAX_HEADER || hlen > len - 4 {
        return Err(FrameError::BadHeaderLength { hlen, len, max: MAX_HEADER });
    }
    body.advance(4);
    let header = body.split_to(hlen);
    Ok(Frame { header, payload: body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{FromAgent, ToAgent};

    #[test]
    fn round_trip_with_payload() {
        let msg = ToAgent::Task { task: 7, attempt: 2, fn_id: 99, timeout_ms: 0 };
        let bytes = encode(&msg, b"pickled args", 1 << 20).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = FrameDecoder::new(1 << 20).decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.message::<ToAgent>().unwrap(), msg);
        assert_eq!(&frame.payload[..], b"pickled args");
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let bytes = encode(&FromAgent::Pong { seq: 1 }, b"", 1024).unwrap();
        let dec = FrameDecoder::new(1024);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(dec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            assert!(dec.missing(&buf).unwrap() > 0);
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut bytes = encode(&FromAgent::Pong { seq: 1 }, b"a", 1024).unwrap();
        bytes.extend(encode(&FromAgent::Pong { seq: 2 }, b"bc", 1024).unwrap());
        let mut buf = BytesMut::from(&bytes[..]);
        let dec = FrameDecoder::new(1024);
        let a = dec.decode(&mut buf).unwrap().unwrap();
        let b = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(a.message::<FromAgent>().unwrap(), FromAgent::Pong { seq: 1 });
        assert_eq!(&b.payload[..], b"bc");
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_rejected_before_the_body_arrives() {
        let dec = FrameDecoder::new(1000);
        let mut buf = BytesMut::from(&1001u32.to_le_bytes()[..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::TooLarge { len: 1001, max: 1000 }));
        assert!(dec.missing(&buf).is_err());
        // u32::MAX must not be mistaken for something small.
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert!(matches!(dec.decode(&mut buf), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn header_length_beyond_the_frame_is_rejected() {
        let mut raw = 10u32.to_le_bytes().to_vec();
        raw.extend(200u32.to_le_bytes());
        raw.extend([0u8; 6]);
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            FrameDecoder::new(1024).decode(&mut buf),
            Err(FrameError::BadHeaderLength { hlen: 200, .. })
        ));
    }

    #[test]
    fn frame_shorter_than_its_header_length_field_is_rejected() {
        let mut buf = BytesMut::from(&[2u8, 0, 0, 0, 1, 1][..]);
        assert_eq!(FrameDecoder::new(1024).decode(&mut buf), Err(FrameError::TooShort { len: 2 }));
    }

    #[test]
    fn garbage_header_is_malformed_not_a_panic() {
        let mut raw = 7u32.to_le_bytes().to_vec();
        raw.extend(3u32.to_le_bytes());
        raw.extend([0xff, 0xff, 0xff]);
        let mut buf = BytesMut::from(&raw[..]);
        let frame = FrameDecoder::new(1024).decode(&mut buf).unwrap().unwrap();
        assert!(matches!(frame.message::<ToAgent>(), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn encoder_refuses_frames_over_the_cap() {
        let err = encode(&FromAgent::Pong { seq: 0 }, &[0u8; 100], 50).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(data: Vec<u8>) {
            let dec = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(frame)) = dec.decode(&mut buf) {
                let _ = frame.message::<ToAgent>();
                let _ = frame.message::<FromAgent>();
            }
        }

        #[test]
        fn any_message_round_trips(task: u64, attempt: u32, fn_id: u64, payload: Vec<u8>) {
            let msg = ToAgent::Task { task, attempt, fn_id, timeout_ms: 0 };
            let bytes = encode(&msg, &payload, 1 << 20).unwrap();
            let mut buf = BytesMut::from(&bytes[..]);
            let frame = FrameDecoder::new(1 << 20).decode(&mut buf).unwrap().unwrap();
            proptest::prop_assert_eq!(frame.message::<ToAgent>().unwrap(), msg);
            proptest::prop_assert_eq!(&frame.payload[..], &payload[..]);
        }
    }
}
