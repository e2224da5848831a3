//! An orchestrator out of file descriptors (it needs one per agent) raises
//! its process's limit on open files to the hard limit and goes on taking
//! agents. A test binary of its own, since it lowers that limit.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use distripool_runtime::conn::client_handshake;
use distripool_runtime::{Orchestrator, OrchestratorConfig, Security};

const KEY: &[u8] = b"open files key";
/// Connections a child process opens and holds, past the lowered limit.
const HELD: usize = 16;

fn limit() -> (u64, u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct passed.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

fn set_soft(soft: u64) {
    let (_, hard) = limit();
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit only reads the struct passed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

#[test]
fn an_orchestrator_out_of_file_descriptors_raises_its_limit_and_takes_agents() {
    let security = Security { key: KEY.to_vec(), ..Default::default() };
    let orch = Orchestrator::start(OrchestratorConfig {
        listen: vec!["127.0.0.1:0".into()],
        security: security.clone(),
        ..Default::default()
    })
    .unwrap();
    let addr = orch.local_addrs()[0];
    let (_, hard) = limit();
    let soft = open_fds() + 4;
    assert!(hard > soft + 2 * HELD as u64, "the hard limit on open files ({hard}) is too low for this test");
    set_soft(soft);

    // Another process holds HELD connections: more than the lowered limit
    // leaves the orchestrator.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import resource, socket, sys\n\
             hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not ours to keep low\n\
             held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]\n\
             print('held', flush=True)\n\
             sys.stdin.read()\n",
            &addr.ip().to_string(),
            &addr.port().to_string(),
            &HELD.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "held");

    let deadline = Instant::now() + Duration::from_secs(30);
    while limit().0 != hard {
        assert!(Instant::now() < deadline, "the limit on open files stayed at {soft} (hard: {hard})");
        std::thread::sleep(Duration::from_millis(10));
    }
    // And an agent still gets in: its handshake completes.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let binding = security.binding();
        let handshake = client_handshake(&mut stream, KEY, &binding);
        tokio::time::timeout(Duration::from_secs(10), handshake).await.expect("in time").expect("handshake");
    });
    drop(holder.stdin.take());
    holder.wait().unwrap();
}
