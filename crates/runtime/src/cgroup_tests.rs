//! Finding this process's memory cgroup, and the files an executor's cgroup
//! is made of (on a plain directory standing in for cgroupfs).

use super::*;

/// A fresh directory, removed (with what is in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("distripool-cgroup-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HYBRID_CGROUP: &str = "9:name=systemd:/\n4:memory:/jobs/42\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

#[test]
fn a_v1_memory_hierarchy_is_found_when_v2_has_no_memory_controller() {
    // /sys/fs/cgroup/unified/cgroup.controllers does not list memory here
    // (or does not exist): v1 it is.
    let (v, dir) = own_memory_cgroup(HYBRID_CGROUP, HYBRID_MOUNTS).unwrap();
    assert_eq!(v, Version::V1);
    assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/memory/jobs/42"));
}

#[test]
fn a_namespaced_mount_root_is_stripped_and_escapes_are_undone() {
    let cgroup = "4:memory:/pod/abc/sub\n";
    let mounts = "35 31 0:32 /pod/abc /sys/fs/my\\040cgroups rw - cgroup cgroup rw,memory\n";
    let (_, dir) = own_memory_cgroup(cgroup, mounts).unwrap();
    assert_eq!(dir, PathBuf::from("/sys/fs/my cgroups/sub"));
}

#[test]
fn no_memory_controller_is_none() {
    let cgroup = "1:cpu:/\n0::/\n";
    let mounts = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
    assert_eq!(own_memory_cgroup(cgroup, mounts), None);
    // A memory line with no mount of its hierarchy: none either.
    assert_eq!(own_memory_cgroup("4:memory:/x\n", mounts), None);
}

#[test]
fn a_v2_cgroup_with_the_memory_controller_is_preferred() {
    let root = TempDir::new();
    let own = root.path().join("user.slice/worker");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
    let cgroup = "4:memory:/x\n0::/user.slice/worker\n";
    let mounts = format!(
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n",
        root.path().display()
    );
    assert_eq!(own_memory_cgroup(cgroup, &mounts), Some((Version::V2, own)));
}

#[test]
fn executor_cgroups_get_the_limit_and_no_swap_then_go() {
    // cgroupfs makes a new cgroup's files itself; a plain directory needs
    // them made by hand, so the v1 layout is built as the kernel would.
    let own = TempDir::new();
    let pid = 4242;
    let base = own.path().join(format!("distripool-{pid}"));
    std::fs::create_dir(&base).unwrap();
    let slot_dir = base.join("executor-3-7");
    std::fs::create_dir(&slot_dir).unwrap();
    std::fs::write(slot_dir.join("memory.memsw.limit_in_bytes"), "").unwrap();
    std::fs::write(slot_dir.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        .unwrap();
    let limit = Arc::new(MemoryLimit {
        bytes: 256 << 20,
        version: Version::V1,
        dir: base.clone(),
        leftover: Mutex::new(Vec::new()),
    });
    let group = limit.executor_cgroup(3, Generation(7)).unwrap();
    let read = |f: &str| std::fs::read_to_string(slot_dir.join(f)).unwrap();
    assert_eq!(read("memory.limit_in_bytes"), (256u64 << 20).to_string());
    assert_eq!(read("memory.memsw.limit_in_bytes"), (256u64 << 20).to_string());
    assert_eq!(group.procs().to_str().unwrap(), slot_dir.join("cgroup.procs").to_str().unwrap());
    assert_eq!(group.oom_kills(), 2);
    assert_eq!(group.limit_bytes(), 256 << 20);
    // A directory with files in it cannot be removed (as a cgroup with a
    // process in it cannot): it is kept and swept once it empties.
    drop(group);
    assert_eq!(limit.leftover.lock().unwrap().len(), 1);
    for f in ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"] {
        std::fs::remove_file(slot_dir.join(f)).unwrap();
    }
    drop(limit);
    assert!(!slot_dir.exists() && !base.exists(), "the executor's cgroup and the agent's directory are gone");
}

#[test]
fn v2_counts_oom_kills_in_memory_events() {
    let own = TempDir::new();
    let base = own.path().join("distripool-1");
    let slot_dir = base.join("executor-0-1");
    std::fs::create_dir_all(&slot_dir).unwrap();
    std::fs::write(slot_dir.join("memory.events"), "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n").unwrap();
    let limit = Arc::new(MemoryLimit {
        bytes: 1 << 30,
        version: Version::V2,
        dir: base,
        leftover: Mutex::new(Vec::new()),
    });
    let group = limit.executor_cgroup(0, Generation(1)).unwrap();
    assert_eq!(std::fs::read_to_string(slot_dir.join("memory.max")).unwrap(), (1u64 << 30).to_string());
    assert!(!slot_dir.join("memory.swap.max").exists(), "no swap file, none written");
    assert_eq!(group.oom_kills(), 1);
    for f in ["memory.events", "memory.max"] {
        std::fs::remove_file(slot_dir.join(f)).unwrap();
    }
    drop(group);
    assert!(!slot_dir.exists(), "an empty executor cgroup goes with its executor");
}

#[test]
fn sizes_read_well() {
    assert_eq!(show_bytes(256 << 20), "256 MiB");
    assert_eq!(show_bytes(3 << 29), "1.5 GiB");
}

#[test]
fn what_agents_that_are_gone_left_is_removed_and_nothing_of_live_ones() {
    let own = TempDir::new();
    let gone = 9_999_999; // above any pid_max
    let live = std::process::id();
    for dir in [
        format!("distripool-{gone}/executor-0-1"),
        format!("distripool-{gone}-agent"),
        format!("distripool-{live}/executor-1-2"),
        "unrelated".to_string(),
    ] {
        std::fs::create_dir_all(own.path().join(dir)).unwrap();
    }
    remove_stale(own.path());
    let mut left: Vec<String> = std::fs::read_dir(own.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [format!("distripool-{live}"), "unrelated".to_string()]);
    assert!(own.path().join(format!("distripool-{live}/executor-1-2")).exists());
}
