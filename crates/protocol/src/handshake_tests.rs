use super::*;

fn run(
    client_key: &[u8],
    server_key: &[u8],
) -> (Result<u64, HandshakeError>, Result<HandshakeMsg, HandshakeError>) {
    let mut c = ClientHandshake::new(client_key, Binding::default(), [1; 32]);
    let mut s = ServerHandshake::new(server_key, Binding::default(), [2; 32]);
    let challenge = s.on_hello(c.hello()).unwrap();
    match c.on_challenge(challenge) {
        Ok(p) => {
            let verdict = s.on_proof(p, 42);
            let reply = match &verdict {
                Ok(m) => m.clone(),
                Err(e) => e.reply().unwrap(),
            };
            (c.on_outcome(reply), verdict)
        }
        Err(e) => {
            // The client tells the server why it stops.
            let verdict = s.on_proof(e.reply().unwrap(), 42);
            (Err(e), verdict)
        }
    }
}

#[test]
fn same_key_is_accepted_on_both_sides() {
    let (client, server) = run(b"secret", b"secret");
    assert_eq!(client, Ok(42));
    assert_eq!(server, Ok(HandshakeMsg::Accept { session: 42 }));
}

#[test]
fn different_keys_fail_on_both_sides() {
    let (client, server) = run(b"secret", b"other");
    assert_eq!(client, Err(HandshakeError::PeerFailedAuth));
    assert_eq!(server, Err(HandshakeError::RejectedAuth));
    assert!(client.unwrap_err().is_auth_failure());
    assert!(server.unwrap_err().is_auth_failure());
}

#[test]
fn a_side_without_a_key_is_named_as_such() {
    let (client, server) = run(b"", b"secret");
    assert_eq!(client, Err(HandshakeError::NoKey));
    assert_eq!(server, Err(HandshakeError::RejectedNoKey));
    let (client, server) = run(b"secret", b"");
    assert_eq!(client, Err(HandshakeError::PeerHasNoKey));
    assert_eq!(server, Err(HandshakeError::RejectedAuth));
    assert_eq!(run(b"", b"").0, Ok(42), "no key on either side is allowed (loopback)");
}

#[test]
fn forged_client_proof_is_refused() {
    let c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    let mut s = ServerHandshake::new(b"k", Binding::default(), [2; 32]);
    let HandshakeMsg::Challenge { proof, .. } = s.on_hello(c.hello()).unwrap() else { panic!() };
    // Reflecting the server's own proof back must not work: proofs are role-bound.
    assert_eq!(s.on_proof(HandshakeMsg::Proof { proof }, 1), Err(HandshakeError::PeerFailedAuth));
}

#[test]
fn replayed_proof_from_an_earlier_session_is_refused() {
    let mut c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    let mut s1 = ServerHandshake::new(b"k", Binding::default(), [2; 32]);
    let proof = c.on_challenge(s1.on_hello(c.hello()).unwrap()).unwrap();
    let mut s2 = ServerHandshake::new(b"k", Binding::default(), [3; 32]);
    s2.on_hello(c.hello()).unwrap();
    assert_eq!(s2.on_proof(proof, 1), Err(HandshakeError::PeerFailedAuth));
}

#[test]
fn version_magic_and_role_are_checked_first() {
    let mut s = ServerHandshake::new(b"k", Binding::default(), [2; 32]);
    let hello = |magic, version, role| HandshakeMsg::Hello {
        magic,
        version,
        role,
        cluster: "default".into(),
        sealed: true,
        nonce: [0; 32],
    };
    assert_eq!(s.on_hello(hello(*b"HTTP/1.1", PROTOCOL_VERSION, Role::Agent)), Err(HandshakeError::BadMagic));
    let err = s.on_hello(hello(MAGIC, PROTOCOL_VERSION + 1, Role::Agent)).unwrap_err();
    assert!(matches!(err, HandshakeError::VersionMismatch { .. }));
    assert_eq!(
        err.reply(),
        Some(HandshakeMsg::Reject { reason: RejectReason::Version { supported: PROTOCOL_VERSION } })
    );
    let err = s.on_hello(hello(MAGIC, PROTOCOL_VERSION, Role::Orchestrator)).unwrap_err();
    assert_eq!(err.reply(), Some(HandshakeMsg::Reject { reason: RejectReason::Role }));
    // A proof before any hello is out of order.
    assert_eq!(s.on_proof(HandshakeMsg::Proof { proof: [0; 32] }, 1), Err(HandshakeError::Unexpected));
}

#[test]
fn client_reports_a_version_mismatch_from_the_server() {
    let mut c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    let other = PROTOCOL_VERSION + 1;
    let err = c
        .on_challenge(HandshakeMsg::Reject { reason: RejectReason::Version { supported: other } })
        .unwrap_err();
    assert_eq!(err, HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: other });
    assert!(err.to_string().contains(&format!("we speak {PROTOCOL_VERSION}, the peer speaks {other}")));
    let err = c.on_challenge(HandshakeMsg::Challenge { version: other, nonce: [0; 32], proof: [0; 32] });
    assert!(matches!(err, Err(HandshakeError::VersionMismatch { theirs, .. }) if theirs == other));
}

#[test]
fn client_refuses_a_peer_that_answers_as_an_agent() {
    let mut c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    let other = ClientHandshake::new(b"k", Binding::default(), [2; 32]);
    let err = c.on_challenge(other.hello()).unwrap_err();
    assert_eq!(err, HandshakeError::WrongRole { expected: Role::Orchestrator, got: Role::Agent });
    assert_eq!(err.reply(), Some(HandshakeMsg::Reject { reason: RejectReason::Role }));
}

#[test]
fn accept_without_a_verified_challenge_is_unexpected() {
    let mut c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    assert_eq!(c.on_outcome(HandshakeMsg::Accept { session: 1 }), Err(HandshakeError::Unexpected));
}

#[test]
fn handshake_messages_fit_the_pre_auth_frame_cap() {
    let c = ClientHandshake::new(b"k", Binding::new("x".repeat(MAX_CLUSTER), true), [0xff; 32]);
    let msgs = [
        c.hello(),
        HandshakeMsg::Challenge { version: u32::MAX, nonce: [0xff; 32], proof: [0xff; 32] },
        HandshakeMsg::Proof { proof: [0xff; 32] },
        HandshakeMsg::Accept { session: u64::MAX },
    ];
    for m in msgs {
        let bytes = crate::frame::encode(&m, b"", crate::HANDSHAKE_MAX_FRAME).unwrap();
        assert!(bytes.len() <= crate::HANDSHAKE_MAX_FRAME);
    }
}

#[test]
fn cluster_and_sealing_must_match_and_are_bound_into_the_proofs() {
    // Another cluster is refused before any key material is used, with a
    // precise error on both sides.
    let c = ClientHandshake::new(b"k", Binding::new("blue", true), [1; 32]);
    let mut s = ServerHandshake::new(b"k", Binding::new("green", true), [2; 32]);
    let err = s.on_hello(c.hello()).unwrap_err();
    assert!(matches!(err, HandshakeError::WrongCluster { .. }));
    let mut c = c;
    let got = c.on_challenge(err.reply().unwrap()).unwrap_err();
    assert_eq!(got, HandshakeError::RejectedCluster { ours: "blue".into() });
    assert!(got.to_string().contains("blue"));

    // Sealing off on one side only.
    let mut c = ClientHandshake::new(b"k", Binding::new("default", false), [1; 32]);
    let mut s = ServerHandshake::new(b"k", Binding::default(), [2; 32]);
    let err = s.on_hello(c.hello()).unwrap_err();
    assert_eq!(err, HandshakeError::SealingMismatch { agent: false, orchestrator: true });
    assert_eq!(
        c.on_challenge(err.reply().unwrap()).unwrap_err(),
        HandshakeError::SealingMismatch { agent: false, orchestrator: true }
    );

    // A peer on the path that rewrites the Hello to match the server only
    // breaks the proofs: each side proves over its own settings.
    let mut c = ClientHandshake::new(b"k", Binding::new("blue", true), [1; 32]);
    let mut s = ServerHandshake::new(b"k", Binding::new("green", true), [2; 32]);
    let HandshakeMsg::Hello { magic, version, role, sealed, nonce, .. } = c.hello() else { panic!() };
    let forged = HandshakeMsg::Hello { magic, version, role, cluster: "green".into(), sealed, nonce };
    let challenge = s.on_hello(forged).unwrap();
    assert_eq!(c.on_challenge(challenge), Err(HandshakeError::PeerFailedAuth));
}

#[test]
fn session_keys_agree_only_for_the_same_binding() {
    let mut c = ClientHandshake::new(b"k", Binding::default(), [1; 32]);
    let mut s = ServerHandshake::new(b"k", Binding::default(), [2; 32]);
    let proof = c.on_challenge(s.on_hello(c.hello()).unwrap()).unwrap();
    c.on_outcome(s.on_proof(proof, 7).unwrap()).unwrap();
    let (mut ck, mut sk) = (c.session_keys().unwrap(), s.session_keys().unwrap());
    let mut record = vec![0u8; crate::cipher::RECORD_PREFIX];
    record.extend_from_slice(b"hello");
    ck.send.seal_record(&mut record).unwrap();
    let mut raw = bytes::BytesMut::from(&record[..]);
    assert_eq!(&sk.recv.open_record(&mut raw).unwrap().unwrap()[..], b"hello");
}

fn peers_run(client: Binding, server: Binding) -> Result<HandshakeMsg, HandshakeError> {
    let mut c = ClientHandshake::new(b"k", client, [1; 32]);
    let mut s = ServerHandshake::new(b"k", server, [2; 32]);
    let challenge = s.on_hello(c.hello())?;
    let proof = c.on_challenge(challenge)?;
    s.on_proof(proof, 7)
}

#[test]
fn agents_authenticate_each_other_as_peers_and_nowhere_else() {
    let cluster = Binding::default();
    let peers = cluster.for_peers(false);
    assert_eq!(peers_run(peers.clone(), peers.clone()), Ok(HandshakeMsg::Accept { session: 7 }));
    // An agent fetching from a peer is not a worker joining an
    // orchestrator, nor the other way round.
    assert_eq!(
        peers_run(peers.clone(), cluster.clone()),
        Err(HandshakeError::WrongRole { expected: Role::Agent, got: Role::Peer })
    );
    assert_eq!(
        peers_run(cluster.clone(), peers.clone()),
        Err(HandshakeError::WrongRole { expected: Role::Peer, got: Role::Agent })
    );
    // A proof made for one kind of connection fails in the other, even with
    // the same key and nonces: the transcripts differ.
    let mut orch = ServerHandshake::new(b"k", cluster.clone(), [2; 32]);
    let mut agent = ClientHandshake::new(b"k", peers.clone(), [1; 32]);
    let HandshakeMsg::Hello { nonce, .. } = agent.hello() else { panic!() };
    let challenge = orch
        .on_hello(HandshakeMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role: Role::Agent,
            cluster: cluster.cluster.clone(),
            sealed: true,
            nonce,
        })
        .unwrap();
    assert_eq!(agent.on_challenge(challenge), Err(HandshakeError::PeerFailedAuth));
    // Between agents frames are sealed unless encryption is off everywhere.
    assert!(Binding::new("c", false).for_peers(true).sealed);
    assert!(!Binding::new("c", false).for_peers(false).sealed);
}
