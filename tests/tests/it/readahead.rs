//! Readahead of the file namespace's readers: a sequential reader finds the blocks after the
//! one it reads loaded (or loading) in the background, each downloaded once; random reads
//! load nothing ahead.

use std::time::Duration;

use blockcache::{Durability, Namespace};
use blockcache_backend::faulty::Op;
use blockcache_tests::{Env, WAIT, data, within};

const BLOCKS: usize = 40;

/// A namespace over `env` holding the file `f` of [`BLOCKS`] distinct blocks, stored and no
/// longer cached; and its content.
async fn stored_file(env: &Env) -> (Namespace, Vec<u8>) {
    let ns = Namespace::open(env.open().await, 1 << 30)
        .await
        .expect("namespace");
    let content = data(5, BLOCKS * 1024);
    let mut w = ns.create("f").await.expect("create");
    w.write(&content).await.expect("write");
    w.finish(Durability::Local).await.expect("finish");
    ns.flush().await.expect("flush");
    ns.cache().clear().await.expect("clear");
    (ns, content)
}

async fn gets_reach(env: &Env, n: u64) {
    while env.faults.calls(Op::Get) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_finds_the_next_blocks_loaded_and_each_is_downloaded_once() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    let mut r = ns.open_read("f").await.expect("open");
    // A read from the file's start: its block, and the first window after it, loading.
    assert_eq!(r.read(0, 1024).await.expect("read")[..], content[..1024]);
    within(
        "the blocks after the first to load ahead",
        WAIT,
        gets_reach(&env, 5),
    )
    .await;
    // The rest through AsyncRead, from the second block on.
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    r.seek(std::io::SeekFrom::Start(1024)).await.expect("seek");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.expect("read the rest");
    assert!(rest == content[1024..], "the file reads back exact");
    ns.shutdown().await.expect("shutdown");
    assert_eq!(
        env.faults.calls(Op::Get),
        BLOCKS as u64,
        "every block downloaded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_load_nothing_ahead() {
    let env = Env::new();
    let (ns, content) = stored_file(&env).await;
    let r = ns.open_read("f").await.expect("open");
    for b in [20usize, 3, 31, 9] {
        let got = r.read(b as u64 * 1024 + 5, 100).await.expect("read");
        assert_eq!(got[..], content[b * 1024 + 5..b * 1024 + 105]);
    }
    // Nothing more is fetched: a prefetch would have started with the read that asked for it.
    let more = tokio::time::timeout(Duration::from_millis(500), gets_reach(&env, 5)).await;
    assert!(
        more.is_err(),
        "{} GETs for 4 random reads",
        env.faults.calls(Op::Get)
    );
    ns.shutdown().await.expect("shutdown");
}
