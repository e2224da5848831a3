//! Agents serving functions to one another over loopback.

use super::*;

fn keys(key: &[u8]) -> PeerKeys {
    let security = Security { key: key.to_vec(), ..Security::default() };
    PeerKeys::new(&security, Timing::default())
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[tokio::test]
async fn a_function_is_fetched_whole_sealed_and_checked() {
    let server = PeerServer::listen(LOCAL, keys(b"k"), 1 << 30).await.unwrap();
    assert!(keys(b"k").binding.sealed && keys(b"k").binding.peer);
    let blob = Bytes::from((0..3 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    server.shelf.put(FnId(5), blob.clone());
    let from = server.addr.to_string();
    let got = fetch(&from, FnId(5), &keys(b"k"), 1 << 30, |b| b == &blob[..]).await.unwrap();
    assert_eq!(got, blob);
    // What the function's id says it is, or nothing.
    let e = fetch(&from, FnId(5), &keys(b"k"), 1 << 30, |_| false).await.unwrap_err();
    assert!(e.to_string().contains("whose content is not 5"), "{e}");
    // Another cluster's key gets nothing.
    let e = fetch(&from, FnId(5), &keys(b"other"), 1 << 30, |_| true).await.unwrap_err();
    assert!(matches!(e, Error::Handshake(_)), "{e}");
    // An agent that does not serve: the fetch fails, it does not hang.
    drop(server);
    let e = fetch(&from, FnId(5), &keys(b"k"), 1 << 30, |_| true).await.unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
}

#[tokio::test]
async fn an_orchestrators_port_refuses_an_agent_fetching() {
    // Something that is not an agent's server (here: a listener that
    // answers the handshake as an orchestrator would) fails the fetch.
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let orch = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        server_handshake(&mut tcp, b"k", &Binding::default(), 1).await
    });
    let e = fetch(&addr, FnId(5), &keys(b"k"), 1 << 30, |_| true).await.unwrap_err();
    assert!(matches!(e, Error::Handshake(_)), "{e}");
    assert!(orch.await.unwrap().is_err(), "the orchestrator side refuses it too");
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_for_a_function_still_arriving_and_gives_up_at_its_limit() {
    let shelf = Arc::new(Shelf::default());
    let waiting = tokio::spawn({
        let shelf = shelf.clone();
        async move { shelf.wait_for(FnId(1), Duration::from_secs(10)).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    shelf.put(FnId(1), Bytes::from_static(b"f"));
    assert_eq!(waiting.await.unwrap(), Some(Bytes::from_static(b"f")));
    // Never put: None once the limit passes (time is paused: it passes at once).
    assert_eq!(shelf.wait_for(FnId(2), Duration::from_secs(10)).await, None);
    shelf.remove(FnId(1));
    assert_eq!(shelf.get(FnId(1)), None);
}
