//! A frame's payload as the writer sends it: one buffer, or several sent
//! back to back without first being joined.
//!
//! A task's arguments reach the orchestrator as the pickle followed by its
//! large buffers (see `_envelope.py`), each still where the caller's Python
//! object keeps it; joining them would copy every byte once more, into
//! memory that is usually new to the process (its page faults cost more
//! than the copy). The writer walks the parts instead, straight into the
//! socket or, sealed, into the records it seals.

use std::sync::Arc;

use bytes::Bytes;

/// One buffer or several, cheap to clone (a retry sends it again).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload(Inner);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Inner {
    One(Bytes),
    Parts { parts: Arc<[Bytes]>, len: usize },
}

impl Default for Inner {
    fn default() -> Self {
        Inner::One(Bytes::new())
    }
}

impl Payload {
    /// The parts in order; empty parts are dropped, and a single part
    /// becomes a plain buffer.
    pub fn from_parts(parts: Vec<Bytes>) -> Self {
        let mut parts: Vec<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        match parts.len() {
            0 => Self::default(),
            1 => Self(Inner::One(parts.pop().unwrap_or_default())),
            _ => {
                let len = parts.iter().map(Bytes::len).sum();
                Self(Inner::Parts { parts: parts.into(), len })
            }
        }
    }

    /// Bytes in all.
    pub fn len(&self) -> usize {
        match &self.0 {
            Inner::One(b) => b.len(),
            Inner::Parts { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts, in the order they are sent.
    pub fn parts(&self) -> &[Bytes] {
        match &self.0 {
            Inner::One(b) => std::slice::from_ref(b),
            Inner::Parts { parts, .. } => parts,
        }
    }

    /// All of it in one buffer: the buffer itself if there is one part,
    /// else a copy (for the rare reader that needs it contiguous).
    pub fn to_bytes(&self) -> Bytes {
        match &self.0 {
            Inner::One(b) => b.clone(),
            Inner::Parts { parts, len } => {
                let mut out = Vec::with_capacity(*len);
                for p in parts.iter() {
                    out.extend_from_slice(p);
                }
                out.into()
            }
        }
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Self(Inner::One(b))
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Self(Inner::One(b.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_order_and_buffers() {
        let a = Bytes::from_static(b"head");
        let big = Bytes::from(vec![7u8; 1 << 20]);
        let p = Payload::from_parts(vec![a.clone(), Bytes::new(), big.clone()]);
        assert_eq!(p.len(), 4 + (1 << 20));
        assert_eq!(p.parts().len(), 2);
        // Not copied: the same memory as the caller's buffer.
        assert_eq!(p.parts()[1].as_ptr(), big.as_ptr());
        let joined = p.to_bytes();
        assert_eq!(&joined[..4], b"head");
        assert!(joined[4..].iter().all(|&b| b == 7));
    }

    #[test]
    fn one_part_is_a_plain_buffer() {
        let b = Bytes::from_static(b"only");
        let p = Payload::from_parts(vec![Bytes::new(), b.clone()]);
        assert_eq!(p, Payload::from(b.clone()));
        assert_eq!(p.to_bytes().as_ptr(), b.as_ptr());
        assert!(Payload::from_parts(Vec::new()).is_empty());
    }
}
