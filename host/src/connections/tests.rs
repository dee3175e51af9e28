use super::*;

fn table(max: usize) -> Table {
    Table {
        epoch: Instant::now(),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        limits: Limits {
            header_read_timeout: Duration::from_millis(100),
            keep_alive_timeout: Duration::from_millis(200),
            body_read_timeout: Duration::from_secs(1),
            max_connections: max,
            grace: Duration::from_secs(1),
        },
        emptied: Notify::new(),
        refusals: RateLimited::new(),
    }
}

fn set(c: &Conn, state: u8, since: u64) {
    c.state.store(state, Ordering::Release);
    c.since.store(since, Ordering::Release);
    c.last_io.store(since, Ordering::Release);
}

#[test]
fn at_the_cap_waiting_connections_give_way_then_half_sent_bodies_never_whole_requests() {
    let t = table(3);
    let (_, whole, _) = t.admit().unwrap();
    let (_, half_body, _) = t.admit().unwrap();
    let (_, waiting, _) = t.admit().unwrap();
    set(&whole, State::BUSY, 0); // the oldest, with a whole request in service
    set(&half_body, State::BUSY, 1);
    half_body.body_done.store(false, Ordering::Release);
    set(&waiting, State::IDLE, 5);
    let (_, fourth, evicted) = t.admit().expect("room is made");
    assert!(evicted);
    assert_eq!(
        waiting.state.load(Ordering::Acquire),
        State::CLOSING,
        "the waiting one first"
    );
    set(&fourth, State::BUSY, 9);
    let (_, _, _) = t.admit().expect("then the half-sent body");
    assert_eq!(half_body.state.load(Ordering::Acquire), State::CLOSING);
    assert_eq!(
        whole.state.load(Ordering::Acquire),
        State::BUSY,
        "never a whole request"
    );
    // Now every connection has a whole request or is new and busy: refused.
    for c in t.conns.lock().unwrap().values() {
        set(c, State::BUSY, 20);
    }
    assert!(t.admit().is_none());
}

#[test]
fn waiting_connections_expire_by_their_timeouts_and_progress_wins_the_race() {
    let t = table(10);
    let (_, head, _) = t.admit().unwrap();
    let (_, idle, _) = t.admit().unwrap();
    let (_, busy, _) = t.admit().unwrap();
    set(&head, State::HEAD, 0);
    set(&idle, State::IDLE, 0);
    set(&busy, State::BUSY, 0);
    t.reap(150);
    assert_eq!(
        t.len(),
        2,
        "the head is closed after the header timeout (100 ms)"
    );
    assert_eq!(head.state.load(Ordering::Acquire), State::CLOSING);
    t.reap(250);
    assert_eq!(
        t.len(),
        1,
        "the idle one after the keep-alive timeout (200 ms)"
    );
    assert!(t
        .conns
        .lock()
        .unwrap()
        .values()
        .all(|c| Arc::ptr_eq(c, &busy)));
    // A connection that moved on is not closed on a decision made before.
    let (_, c, _) = t.admit().unwrap();
    set(&c, State::IDLE, 0);
    assert!(c.shift(State::IDLE, State::BUSY), "its request arrives");
    assert!(!c.close_if(State::IDLE));
    assert_eq!(c.state.load(Ordering::Acquire), State::BUSY);
}

#[test]
fn shutdown_closes_what_has_no_whole_request_and_lets_the_rest_finish() {
    let t = table(10);
    let (_, head, _) = t.admit().unwrap();
    let (_, half_body, _) = t.admit().unwrap();
    set(&half_body, State::BUSY, 0);
    half_body.body_done.store(false, Ordering::Release);
    let (_, serving, _) = t.admit().unwrap();
    set(&serving, State::BUSY, 0);
    let (_, idle, _) = t.admit().unwrap();
    set(&idle, State::IDLE, 0);
    assert_eq!(
        t.begin_shutdown(),
        (2, 2),
        "idle ones close through hyper's graceful shutdown"
    );
    assert_eq!(head.state.load(Ordering::Acquire), State::CLOSING);
    assert_eq!(t.close_all(), 2);
}

#[test]
fn the_fd_limit_is_raised_and_connections_fit_below_it() {
    let fit = connections_that_fit() as u64;
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads this process's limit into a valid struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    assert_eq!(l.rlim_cur, l.rlim_max.min(1 << 20));
    assert_eq!(fit, l.rlim_cur.saturating_sub(FD_HEADROOM).max(16));
}
