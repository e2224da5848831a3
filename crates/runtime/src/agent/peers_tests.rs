//! Agents serving functions to one another over loopback.

use super::super::shelf::Coming;
use super::*;
use tokio::io::AsyncReadExt;

fn keys(key: &[u8]) -> PeerKeys {
    let security = Security { key: key.to_vec(), ..Security::default() };
    PeerKeys::new(&security, Timing::default())
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const MAX: usize = 1 << 30;

/// The id of a function that names no needs.
fn id_of(function: &Bytes) -> FnId {
    crate::orchestrator::content_id(function, &[])
}

fn blob(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

#[tokio::test]
async fn a_function_is_fetched_whole_sealed_and_checked() {
    let server = PeerServer::listen(LOCAL, keys(b"k"), MAX).await.unwrap();
    assert!(keys(b"k").binding.sealed && keys(b"k").binding.peer);
    let blob = blob(3 * PIECE + 5);
    // Its content id, hashed piece by piece as they come, with the needs
    // it names after them.
    let needs = vec![FnId(7), FnId(9)];
    let id = crate::orchestrator::content_id(&blob, &needs);
    server.shelf.put(id, blob.clone());
    let from = server.addr.to_string();
    let got = fetch(&from, id, &keys(b"k"), MAX, None, needs).await.unwrap();
    assert_eq!(got, blob);
    // What the function's id says it is, or nothing: other needs, or held
    // under an id that is not its content's.
    let e = fetch(&from, id, &keys(b"k"), MAX, None, vec![FnId(7)]).await.unwrap_err();
    assert!(e.to_string().contains(&format!("whose content is not {:x}", id.0)), "{e}");
    server.shelf.put(FnId(5), blob.clone());
    let e = fetch(&from, FnId(5), &keys(b"k"), MAX, None, vec![]).await.unwrap_err();
    assert!(e.to_string().contains("whose content is not 5"), "{e}");
    // Larger than this side's frame limit: refused.
    let e = fetch(&from, FnId(5), &keys(b"k"), PIECE, None, vec![]).await.unwrap_err();
    assert!(e.to_string().contains("past the frame limit"), "{e}");
    // Another cluster's key gets nothing.
    let e = fetch(&from, FnId(5), &keys(b"other"), MAX, None, vec![]).await.unwrap_err();
    assert!(matches!(e, Error::Handshake(_)), "{e}");
    // An agent that does not serve: the fetch fails, it does not hang.
    drop(server);
    let e = fetch(&from, FnId(5), &keys(b"k"), MAX, None, vec![]).await.unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e}");
}

#[tokio::test]
async fn pieces_pass_down_a_chain_as_they_arrive() {
    // a is still receiving the function; b fetches from a, c from b.
    let (a, b) = (
        PeerServer::listen(LOCAL, keys(b"k"), MAX).await.unwrap(),
        PeerServer::listen(LOCAL, keys(b"k"), MAX).await.unwrap(),
    );
    let whole = blob(2 * PIECE + 7);
    let id = id_of(&whole);
    let coming: Arc<Coming> = a.shelf.coming(id, whole.len());
    coming.push(whole.slice(..PIECE));
    let (from_a, from_b) = (a.addr.to_string(), b.addr.to_string());
    let b_shelf = b.shelf.clone();
    let b_fetch =
        tokio::spawn(async move { fetch(&from_a, id, &keys(b"k"), MAX, Some(&b_shelf), vec![]).await });
    // c asks b, which holds the first piece only once b's fetch brings it.
    let c_fetch = tokio::spawn(async move { fetch(&from_b, id, &keys(b"k"), MAX, None, vec![]).await });
    coming.push(whole.slice(PIECE..2 * PIECE));
    coming.push(whole.slice(2 * PIECE..));
    assert_eq!(b_fetch.await.unwrap().unwrap(), whole);
    assert_eq!(c_fetch.await.unwrap().unwrap(), whole);
}

#[tokio::test]
async fn a_server_whose_own_fetch_failed_resumes_from_the_whole_function() {
    let a = PeerServer::listen(LOCAL, keys(b"k"), MAX).await.unwrap();
    let whole = blob(2 * PIECE + 1);
    let id = id_of(&whole);
    let coming = a.shelf.coming(id, whole.len());
    coming.push(whole.slice(..PIECE));
    let from = a.addr.to_string();
    let fetching = tokio::spawn(async move { fetch(&from, id, &keys(b"k"), MAX, None, vec![]).await });
    // a's own fetch fails after one piece; the orchestrator then sends it
    // the function, and what a serves goes on from the second piece.
    a.shelf.failed(id, &coming);
    a.shelf.put(id, whole.clone());
    assert_eq!(fetching.await.unwrap().unwrap(), whole);
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
    let e = fetch(&addr, FnId(5), &keys(b"k"), MAX, None, vec![]).await.unwrap_err();
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
    assert!(matches!(waiting.await.unwrap(), Some(Held::Whole(b)) if b == "f"));
    // Never put: None once the limit passes (time is paused: it passes at once).
    assert!(shelf.wait_for(FnId(2), Duration::from_secs(10)).await.is_none());
    shelf.remove(FnId(1));
    assert!(shelf.get(FnId(1)).is_none());
}

#[tokio::test]
async fn requests_end_when_the_serving_session_does() {
    // One waits for a function not there yet, one for the rest of one
    // still coming; the server's session ends: both fail now, not after
    // the wait's limit.
    let a = PeerServer::listen(LOCAL, keys(b"k"), MAX).await.unwrap();
    let whole = blob(2 * PIECE);
    let coming = a.shelf.coming(FnId(6), whole.len());
    coming.push(whole.slice(..PIECE));
    let from = a.addr.to_string();
    let fetch_of = |id: u64| {
        let from = from.clone();
        tokio::spawn(async move { fetch(&from, FnId(id), &keys(b"k"), MAX, None, vec![]).await })
    };
    let (absent, halfway) = (fetch_of(7), fetch_of(6));
    // Both requests are in once the server holds two connections' permits.
    let accepted = async {
        while a.at_once.available_permits() > SERVING_AT_ONCE - 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), accepted).await.expect("both connections accepted");
    drop(a);
    // Not served: "does not hold it" (before any piece), or the connection
    // closed (after some); either way the fetcher then gets it elsewhere.
    let limit = Duration::from_secs(30);
    for fetching in [absent, halfway] {
        let e = tokio::time::timeout(limit, fetching).await.expect("ended").unwrap().unwrap_err();
        assert!(e.to_string().contains("does not hold it") || matches!(e, Error::Io(_)), "{e}");
    }
}

/// Keys whose heartbeat and silence limit are short.
fn quick_keys() -> PeerKeys {
    let security = Security { key: b"k".to_vec(), ..Security::default() };
    let timing = Timing {
        heartbeat: Duration::from_millis(50),
        silence: Duration::from_millis(300),
        ..Timing::default()
    };
    PeerKeys::new(&security, timing)
}

#[tokio::test]
async fn a_fetch_outlasts_the_silence_limit_while_its_source_still_receives_the_function() {
    let a = PeerServer::listen(LOCAL, quick_keys(), MAX).await.unwrap();
    let whole = blob(PIECE + 3);
    let id = id_of(&whole);
    let coming = a.shelf.coming(id, whole.len());
    coming.push(whole.slice(..PIECE));
    let from = a.addr.to_string();
    let mut fetching = tokio::spawn(async move { fetch(&from, id, &quick_keys(), MAX, None, vec![]).await });
    // The rest reaches the source only after several of the fetcher's
    // silence limits; the source says it is waiting meanwhile, and the
    // fetch does not end.
    let early = tokio::time::timeout(4 * quick_keys().timing.silence, &mut fetching).await;
    assert!(early.is_err(), "the fetch ended while its source was still receiving: {early:?}");
    coming.push(whole.slice(PIECE..));
    let got = tokio::time::timeout(Duration::from_secs(30), fetching).await.expect("fetched");
    assert_eq!(got.unwrap().unwrap(), whole);
}

#[tokio::test]
async fn a_fetch_from_a_source_gone_silent_fails_at_the_silence_limit() {
    // A source that answers the handshake and the request, then says
    // nothing more (stopped, or cut off without a reset).
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let keys = quick_keys();
    let binding = keys.binding.clone();
    let (held, mut hold) = tokio::sync::oneshot::channel::<()>();
    let silent = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        server_handshake(&mut tcp, b"k", &binding, 0).await.unwrap();
        let _ = held.send(());
        // Keep the connection open, saying nothing.
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    });
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(30), fetch(&addr, FnId(9), &keys, MAX, None, vec![]))
        .await
        .expect("the fetch ends")
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(hold.try_recv().is_ok(), "the handshake was made");
    assert!(started.elapsed() >= keys.timing.silence, "ended after {:?}", started.elapsed());
    silent.abort();
}
