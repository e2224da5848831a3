//! The agent's memfds: written and read back, lent again with their
//! mappings, and how an executor's tasks and results go through them.

use super::*;

#[test]
fn what_is_written_reads_back_and_a_returned_memfd_is_lent_again() {
    // One test: the pool is the process's.
    let data: Vec<u8> = (0..3 * AT_LEAST + 17).map(|i| (i * 7) as u8).collect();
    let mut lease = Lease::take(data.len()).unwrap();
    let name = lease.memfd().name();
    lease.write(&data).unwrap();
    let parts = lease.parts(&[(0, 5), (4096, data.len() as u64 - 4096)]).unwrap();
    assert_eq!(&parts[0][..], &data[..5]);
    assert_eq!(&parts[1][..], &data[4096..]);
    drop(parts);
    // Back in the pool once the parts are gone: the next lease of that
    // size gets the same memfd, pages and all, and its mapping: what is
    // written next reads back through it, not through a new one.
    let mut again = Lease::take(data.len()).unwrap();
    assert_eq!(again.memfd().name(), name);
    let view = |l: &Lease| l.memfd().view.as_ref().map(|v| (v.addr, v.len));
    let (addr, len) = view(&again).expect("kept with the memfd");
    let next: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    again.write(&next).unwrap();
    let parts = again.parts(&[(8192, 100)]).unwrap();
    assert_eq!(&parts[0][..], &next[8192..8292]);
    drop(parts);
    let mut again = Lease::take(data.len()).unwrap();
    assert_eq!(view(&again), Some((addr, len)), "the same mapping, not a new one");
    // A result past the mapping's end (the memfd grew) maps it anew, all of it.
    let longer: Vec<u8> = (0..len + 3 * 4096).map(|i| (i * 13) as u8).collect();
    again.write(&longer).unwrap();
    let parts = again.parts(&[(len as u64, 4096)]).unwrap();
    assert_eq!(&parts[0][..], &longer[len..len + 4096]);
    drop(parts);
    let again = Lease::take(data.len()).unwrap();
    assert!(view(&again).is_some_and(|(_, l)| l >= longer.len()));
    check_refusals(again, name, data.len());
}

fn check_refusals(again: Lease, name: (u32, u64), size: usize) {
    // A reply said to end past the memfd's end is an error, not SIGBUS.
    let err = again.parts(&[(0, 1 << 30)]).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    // A retired one is closed, never lent again.
    let again = Lease::take(size).unwrap();
    assert_eq!(again.memfd().name(), name);
    again.retire();
    let other = Lease::take(size).unwrap();
    assert_ne!(other.memfd().name().1, name.1);
    drop(other);
    an_executors_tasks_share_when_it_can_and_its_results_come_back_whole();
}

/// An envelope of `meta` bytes of pickle and `tail` bytes of buffers.
fn envelope(meta: usize, tail: usize) -> Bytes {
    let mut p = vec![1u8];
    p.extend_from_slice(&(meta as u32).to_le_bytes());
    p.extend(std::iter::repeat_n(9u8, meta));
    p.extend((0..tail).map(|i| i as u8));
    p.into()
}

fn an_executors_tasks_share_when_it_can_and_its_results_come_back_whole() {
    let mut s = Sharing::default();
    let big = envelope(40, 2 * AT_LEAST);
    s.can_open = true;
    assert!(matches!(s.plan(1, 1, &big), Plan::Inline), "not where only functions are shared");
    s.finished(1, 0, Bytes::new());
    (s.can_open, s.share_tasks) = (false, true);
    assert!(matches!(s.plan(1, 1, &big), Plan::Inline), "not before the executor said it can");
    s.can_open = true;
    assert!(matches!(s.plan(2, 1, &envelope(40, AT_LEAST - 1)), Plan::Inline), "small buffers stay inline");
    assert!(
        matches!(s.plan(3, 1, &Bytes::from(vec![0u8; 2 * AT_LEAST])), Plan::Inline),
        "a plain pickle too"
    );
    // Their results (in order) pass through as they are.
    for task in [1, 2, 3] {
        let out = s.finished(task, 0, Bytes::from_static(b"r")).payload().unwrap();
        assert_eq!(out.parts(), [Bytes::from_static(b"r")]);
    }
    assert!(s.held.is_empty(), "an inline task counted as sent is let go with its result");
    let Plan::Shared { head, tail: Some((tail, mut args)), mut reply } = s.plan(10, 1, &big) else {
        panic!("a large envelope goes through memfds");
    };
    assert_eq!(head, big.slice(..45));
    assert_eq!(tail, big.slice(45..));
    args.write(&tail).unwrap();
    let args_name = args.memfd().name();
    // The executor answers with its buffers at two places in the reply
    // memfd, and says it kept its arguments.
    reply.write(&[7u8; 3 * 4096]).unwrap();
    s.sent(10, 1, Some(args), Some(reply));
    let mut places = 2u32.to_le_bytes().to_vec();
    for (o, n) in [(0u64, 5u64), (8192, 100)] {
        places.extend_from_slice(&o.to_le_bytes());
        places.extend_from_slice(&n.to_le_bytes());
    }
    let answer = [&places[..], b"head"].concat();
    let out = s.finished(10, IN_REPLY | KEPT, answer.into()).payload().unwrap();
    assert_eq!(out.parts().len(), 3);
    assert_eq!(&out.parts()[0][..], b"head");
    assert_eq!(out.len(), 4 + 5 + 100);
    // The kept memfd is closed; the function's next task gets a reply
    // memfd even with small arguments.
    let again = Lease::take(2 * AT_LEAST).unwrap();
    assert_ne!(again.memfd().name().1, args_name.1);
    drop(again);
    assert!(matches!(s.plan(13, 1, &Bytes::from_static(b"small")), Plan::Shared { tail: None, .. }));
    assert!(matches!(s.plan(14, 2, &Bytes::from_static(b"small")), Plan::Inline));
    s.finished(14, 0, Bytes::new());
    // A small result in that reply memfd's place: back to inline.
    s.sent(11, 1, None, Lease::take(0));
    let out = s.finished(11, 0, Bytes::from_static(b"tiny")).payload().unwrap();
    assert_eq!(out.parts(), [Bytes::from_static(b"tiny")]);
    assert!(matches!(s.plan(15, 1, &Bytes::from_static(b"small")), Plan::Inline));
    s.finished(15, 0, Bytes::new());
    // A result said to be in a reply memfd the task was not given.
    s.sent(12, 1, None, None);
    let err = s.finished(12, IN_REPLY, Bytes::from_static(b"x")).payload().unwrap_err();
    assert!(err.to_string().contains("not given"), "{err}");
}
