//! Arbitrary bytes as message headers of every kind: decoding must never
//! panic, and whatever decodes must encode back to something that decodes to
//! the same message.
#![no_main]

use distripool_protocol::handshake::HandshakeMsg;
use distripool_protocol::{frame, Frame, FromAgent, ToAgent};
use libfuzzer_sys::fuzz_target;

fn check<T>(data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let f = Frame { header: data.to_vec().into(), payload: Default::default() };
    if let Ok(msg) = f.message::<T>() {
        let bytes = frame::encode(&msg, b"", 1 << 20).expect("a decoded message encodes");
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        let again = distripool_protocol::FrameDecoder::new(1 << 20).decode(&mut buf).unwrap().unwrap();
        assert_eq!(again.message::<T>().unwrap(), msg);
    }
}

fuzz_target!(|data: &[u8]| {
    check::<ToAgent>(data);
    check::<FromAgent>(data);
    check::<HandshakeMsg>(data);
});
