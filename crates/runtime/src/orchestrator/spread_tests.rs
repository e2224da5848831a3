//! The routes large functions take from agent to agent.

use super::*;

const F: FnId = FnId(7);
const BIG: usize = SPREAD_AT_LEAST;

fn addr(w: u64) -> String {
    format!("10.0.0.{w}:9")
}

fn serving(n: u64) -> Spread {
    let mut s = Spread::default();
    for w in 1..=n {
        s.serves(WorkerId(w), addr(w));
    }
    s
}

fn from(w: u64) -> Route {
    Route::From(addr(w))
}

#[test]
fn a_large_function_goes_down_a_chain_crossing_each_link_once() {
    let mut s = serving(4);
    assert_eq!(s.route(FnId(1), BIG - 1, WorkerId(1)), Route::Direct, "small ones: from the orchestrator");
    assert_eq!(s.route(F, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(F, BIG, WorkerId(2)), from(1), "1 serves it once it is in");
    // Each fetching agent passes it on as it comes: a chain at once.
    assert_eq!(s.route(F, BIG, WorkerId(3)), from(2));
    assert_eq!(s.route(F, BIG, WorkerId(4)), from(3));
    assert_eq!(s.fetched(F, WorkerId(2)), vec![]);
    assert_eq!(s.fetched(F, WorkerId(3)), vec![]);
    assert_eq!(s.fetched(F, WorkerId(4)), vec![]);
    // A fifth gets it from the newest holder that served none.
    s.serves(WorkerId(5), addr(5));
    assert_eq!(s.route(F, BIG, WorkerId(5)), from(4));
}

#[test]
fn a_holder_serves_again_only_when_nothing_else_would_free_one() {
    // 2 does not serve (it said no address).
    let mut s = Spread::default();
    s.serves(WorkerId(1), addr(1));
    s.serves(WorkerId(3), addr(3));
    assert_eq!(s.route(F, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(F, BIG, WorkerId(2)), from(1));
    assert_eq!(s.route(F, BIG, WorkerId(3)), Route::Wait, "1 serves one at a time");
    assert_eq!(s.fetched(F, WorkerId(2)), vec![(WorkerId(3), from(1))], "1 is the only holder that serves");
    s.serves(WorkerId(4), addr(4));
    assert_eq!(s.route(F, BIG, WorkerId(4)), from(3), "3 has served none");
}

#[test]
fn a_holder_that_failed_a_fetch_is_named_no_more() {
    let mut s = serving(4);
    assert_eq!(s.route(F, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(F, BIG, WorkerId(2)), from(1));
    assert_eq!(s.route(F, BIG, WorkerId(3)), from(2));
    // 2's fetch from 1 fails: the orchestrator sends it to 2, which goes
    // on serving 3 from that copy.
    assert_eq!(s.not_fetched(F, WorkerId(2)), vec![]);
    assert_eq!(s.route(F, BIG, WorkerId(4)), from(3));
    // Of 2, 3 and 4, none 1: not for this function, nor for another.
    for w in 5..9 {
        s.serves(WorkerId(w), addr(w));
        assert_ne!(s.route(F, BIG, WorkerId(w)), from(1));
    }
    let g = FnId(8);
    assert_eq!(s.route(g, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(g, BIG, WorkerId(2)), Route::Direct, "1 holds it but serves no more");
}

#[test]
fn an_agent_that_leaves_frees_what_it_held_up() {
    let mut s = Spread::default();
    s.serves(WorkerId(1), addr(1));
    assert_eq!(s.route(F, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(F, BIG, WorkerId(2)), from(1));
    assert_eq!(s.route(F, BIG, WorkerId(3)), Route::Wait);
    // The fetcher leaves: its source is free for the one waiting.
    assert_eq!(s.left(WorkerId(2)), vec![(F, WorkerId(3), from(1))]);
    // The only holder leaves while 3 fetches from it: the one waiting gets
    // it from the orchestrator, there being no holder left; 3's fetch
    // fails, and it is sent the function too.
    assert_eq!(s.route(F, BIG, WorkerId(4)), Route::Wait);
    assert_eq!(s.left(WorkerId(1)), vec![(F, WorkerId(4), Route::Direct)]);
    assert_eq!(s.not_fetched(F, WorkerId(3)), vec![]);
    // Forgotten: the next agent to need it gets it from the orchestrator.
    s.forget(F);
    assert_eq!(s.route(F, BIG, WorkerId(4)), Route::Direct);
}

#[test]
fn an_agent_serving_on_loopback_is_named_only_to_agents_on_its_machine() {
    let mut s = Spread::default();
    s.joined(WorkerId(1), "127.0.0.1:5000");
    s.serves(WorkerId(1), "127.0.0.1:9".into());
    s.joined(WorkerId(2), "10.0.0.2:5000");
    s.joined(WorkerId(3), "local");
    assert_eq!(s.route(F, BIG, WorkerId(1)), Route::Direct);
    assert_eq!(s.route(F, BIG, WorkerId(2)), Route::Direct, "1 cannot be reached from another machine");
    assert_eq!(s.route(F, BIG, WorkerId(3)), Route::From("127.0.0.1:9".into()));
}
