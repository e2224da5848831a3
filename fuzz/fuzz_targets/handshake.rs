//! The handshake state machines fed arbitrary messages in arbitrary order,
//! on both sides: they must never panic, and must never accept a peer that
//! did not prove the key.
#![no_main]

use distripool_protocol::handshake::HandshakeMsg;
use distripool_protocol::{Binding, ClientHandshake, Frame, ServerHandshake};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"the fuzzer does not know this key";

fn decode(data: &[u8]) -> Option<HandshakeMsg> {
    Frame { header: data.to_vec().into(), payload: Default::default() }.message().ok()
}

fuzz_target!(|input: (Vec<Vec<u8>>, bool)| {
    let (messages, honest_hello) = input;
    let mut server = ServerHandshake::new(KEY, Binding::default(), [7; 32]);
    let mut client = ClientHandshake::new(KEY, Binding::default(), [9; 32]);
    let mut server_accepted = false;
    let mut client_accepted = false;
    let mut step = 0;
    for raw in messages.iter().take(8) {
        let Some(msg) = decode(raw) else { continue };
        // Server side: the fuzzer plays the agent.
        let r = if step == 0 {
            let hello = if honest_hello { client.hello() } else { msg.clone() };
            server.on_hello(hello).map(|_| ())
        } else {
            server.on_proof(msg.clone(), 1).map(|_| ())
        };
        if step > 0 && r.is_ok() {
            server_accepted = true;
        }
        // Client side: the fuzzer plays the orchestrator.
        if client.on_challenge(msg.clone()).is_ok() || client.on_outcome(msg).is_ok() {
            client_accepted = true;
        }
        step += 1;
    }
    // Without the key, the fuzzer can forge neither proof.
    assert!(!server_accepted, "server accepted a forged proof");
    assert!(!client_accepted, "client accepted a forged challenge");
});
