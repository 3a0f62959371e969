//! End to end with the real binaries: files dropped into the watched directory arrive
//! byte-identical, and the pair survives a receiver restart.

use std::fs;
use std::path::Path;
use std::time::Duration;

use skyferry_tests::faults::{content, must_write as write_atomic};
use skyferry_tests::{Pair, PairOptions};

const CHUNK: usize = 64 * 1024;

/// The 200-file mix: every boundary size around the chunk size, many small and medium
/// files in nested directories, and one of 100 MB.
fn write_mix(root: &Path) -> u64 {
    let boundary = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17];
    let mut total = 0u64;
    for i in 0..200usize {
        let len = match boundary.get(i) {
            Some(&len) => len,
            None if i == 7 => 100 * 1000 * 1000,
            None => (i * 7919) % (4 * CHUNK) + i,
        };
        let path = root.join(format!("night-{}/det{:02}/frame{i:03}.fits", i % 3, i % 84));
        write_atomic(&path, &content(len, i as u64));
        total += len as u64;
    }
    total
}

#[test]
fn two_hundred_mixed_files_arrive_identical() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    let bytes = write_mix(&pair.source());
    let report = pair
        .wait_replicated(Duration::from_secs(300))
        .expect("replication");
    report.ensure_identical().expect("identical trees");
    assert_eq!(report.files, 200);
    assert_eq!(report.bytes, bytes);
    let status = pair
        .wait_done(200, Duration::from_secs(10))
        .expect("status");
    assert_eq!(status["done"], 200, "journal: {status}");
    assert_eq!(status["pending"], 0, "journal: {status}");

    // Shutdown on SIGTERM is clean.
    assert!(pair.stop_agent().expect("stop agent").success());
    assert!(pair.stop_receiver().expect("stop receiver").success());
}

#[test]
fn receiver_restarted_mid_run_and_every_file_still_arrives() {
    let mut pair = Pair::start(PairOptions {
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    for i in 0..40 {
        let path = pair.source().join(format!("n/f{i:02}.fits"));
        write_atomic(&path, &content(2 * 1000 * 1000 + i, 100 + i as u64));
    }
    // Let some of it through, then kill the receiver in the middle of the run.
    std::thread::sleep(Duration::from_millis(700));
    pair.kill_receiver().expect("kill receiver");
    // More files arrive while the receiver is down: the agent journals them.
    for i in 40..60 {
        let path = pair.source().join(format!("n/f{i:02}.fits"));
        write_atomic(&path, &content(300 * 1000 + i, 100 + i as u64));
    }
    std::thread::sleep(Duration::from_secs(2));
    pair.start_receiver().expect("restart receiver");
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication after restart");
    report.ensure_identical().expect("identical trees");
    assert_eq!(report.files, 60);
    let log = pair.agent_log().expect("agent log");
    assert!(
        log.contains("disconnected from the receiver") || log.contains("cannot connect"),
        "the agent noticed the outage:\n{log}"
    );
}

#[test]
fn an_agent_from_another_ca_is_refused_and_says_so() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let foreign = pair
        .foreign_agent_identity("kiso-01")
        .expect("foreign identity");
    pair.set_agent_identity(foreign)
        .expect("use foreign identity");
    pair.start_receiver().expect("start receiver");
    pair.start_agent().expect("start agent");
    write_atomic(&pair.source().join("a.fits"), &content(1000, 1));

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (agent_log, receiver_log) = loop {
        let (a, r) = (
            pair.agent_log().unwrap_or_default(),
            pair.receiver_log().unwrap_or_default(),
        );
        let agent_says =
            a.contains("TLS handshake failed") || a.contains("not signed by the configured CA");
        let receiver_says = r.contains("not signed by this receiver's CA");
        if agent_says && receiver_says {
            break (a, r);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no clear refusal in the logs:\n--- agent\n{a}\n--- receiver\n{r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!pair.published().join("a.fits").exists(), "nothing stored");
    assert!(agent_log.contains("cannot connect"), "{agent_log}");
    assert!(receiver_log.contains("handshake failed"), "{receiver_log}");
}

#[test]
fn an_agent_claiming_another_id_is_refused() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    // A certificate from the right CA, but for a different agent name.
    let other = pair.issue_agent_identity("kiso-02").expect("identity");
    pair.set_agent_identity(other).expect("use identity");
    pair.start_receiver().expect("start receiver");
    pair.start_agent().expect("start agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = pair.agent_log().unwrap_or_default();
        if a.contains("is not the name in the agent's certificate") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "agent log:\n{a}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_changed_file_is_a_new_version_and_the_old_one_is_kept() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    let path = pair.source().join("n/a.fits");
    let v1 = content(3 * CHUNK + 5, 1);
    write_atomic(&path, &v1);
    pair.wait_replicated(Duration::from_secs(60))
        .expect("v1 replicated")
        .ensure_identical()
        .expect("v1 identical");

    let v2 = content(2 * CHUNK + 9, 2);
    write_atomic(&path, &v2);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while fs::read(pair.published().join("n/a.fits")).ok().as_deref() != Some(&v2[..]) {
        assert!(
            std::time::Instant::now() < deadline,
            "v2 never arrived\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old version was moved aside, not overwritten.
    let versions = pair.storage().join(".skyferry/versions/kiso-01/n");
    let kept: Vec<_> = fs::read_dir(&versions)
        .expect("versions dir")
        .map(|e| fs::read(e.expect("entry").path()).expect("read kept version"))
        .collect();
    assert_eq!(kept, vec![v1], "exactly the old version is kept");
    // The published file carries the source's mtime.
    let src_mtime = fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let dst_mtime = fs::metadata(pair.published().join("n/a.fits"))
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(src_mtime, dst_mtime);
}

/// Lines of the receiver's log that record a file stored, and the connections (remote
/// addresses, from the `conn{remote=…}` span) they came over.
fn stores_by_connection(log: &str) -> (usize, std::collections::BTreeSet<String>) {
    let stored: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("}: stored agent="))
        .collect();
    let remotes = stored
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("conn{remote=")? + "conn{remote=".len()..];
            Some(rest[..rest.find('}')?].to_owned())
        })
        .collect();
    (stored.len(), remotes)
}

/// Striped over four connections (lanes) with the receiver killed in the middle: the
/// files spread over all four, every one arrives byte-identical and is stored once, and
/// the receiver saw one agent instance with four lanes, not four agents superseding each
/// other.
#[test]
fn four_connections_share_the_files_and_a_receiver_kill_loses_and_duplicates_nothing() {
    let mut pair = Pair::start(PairOptions {
        connections: 4,
        parallel_files: 8,
        // Room for a restarted receiver's view: the old lanes may linger until timed out.
        max_connections_per_agent: Some(8),
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    let mut bytes = 0u64;
    for i in 0..80usize {
        let len = if i % 20 == 0 {
            6_000_000
        } else {
            150_000 + (i * 7919) % 700_000
        };
        let path = pair.source().join(format!("n{}/f{i:02}.fits", i % 4));
        write_atomic(&path, &content(len, 300 + i as u64));
        bytes += len as u64;
    }
    std::thread::sleep(Duration::from_millis(900));
    pair.kill_receiver().expect("kill receiver");
    for i in 80..100usize {
        let len = 200_000 + i;
        let path = pair.source().join(format!("late/f{i:02}.fits"));
        write_atomic(&path, &content(len, 300 + i as u64));
        bytes += len as u64;
    }
    std::thread::sleep(Duration::from_secs(1));
    pair.start_receiver().expect("restart receiver");
    let report = pair
        .wait_replicated(Duration::from_secs(180))
        .expect("replication over four connections");
    report.ensure_identical().expect("identical trees");
    assert_eq!((report.files, report.bytes), (100, bytes));
    // The last acknowledgements may still be on their way to the journal.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pair.agent_status().expect("status")["done"] != 100
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = pair.agent_status().expect("status");
    assert_eq!(status["done"], 100, "journal: {status}");
    assert_eq!(status["pending"], 0, "journal: {status}");

    let log = pair.receiver_log().expect("receiver log");
    let (stored, remotes) = stores_by_connection(&log);
    assert_eq!(stored, 100, "one store per file:\n{log}");
    assert!(
        pair.storage()
            .join(".skyferry/versions")
            .read_dir()
            .map_or(true, |mut d| d.next().is_none()),
        "no file was stored twice (no earlier version kept aside)"
    );
    // Four lanes before the kill and four after: eight sockets at most carried files,
    // and at least three per run did (a lane can be between files when the kill comes).
    assert!(remotes.len() >= 4, "files came over {remotes:?}");
    for lane in 0..4 {
        assert!(
            log.contains(&format!("lane={lane} lanes=4")),
            "lane {lane} connected:\n{log}"
        );
    }
    assert!(
        !log.contains("superseded"),
        "the lanes of one agent never superseded each other:\n{log}"
    );
}

/// One large file with four connections travels on all of them: its session on one lane
/// takes chunks from stripe streams on the other three (docs/protocol.md §3, "Striping
/// one file"), and it arrives byte-identical, stored once.
#[test]
fn one_large_file_is_striped_over_every_connection() {
    let mut pair = Pair::start(PairOptions {
        connections: 4,
        max_connections_per_agent: Some(8),
        ..PairOptions::default()
    })
    .expect("start pair");
    let len = 96 << 20; // 24 chunks of 4 MiB
    write_atomic(&pair.source().join("big/movie.fits"), &content(len, 77));
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication");
    report.ensure_identical().expect("identical trees");
    assert_eq!((report.files, report.bytes), (1, len as u64));
    let log = pair.receiver_log().expect("receiver log");
    let (stored, _) = stores_by_connection(&log);
    assert_eq!(stored, 1, "stored once:\n{log}");
    let striped: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("stripe stream ended"))
        .filter_map(|l| {
            l.split("chunks=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(striped.len(), 3, "a stripe on each other lane:\n{log}");
    assert!(
        striped.iter().all(|&n| n > 0),
        "every stripe carried chunks: {striped:?}"
    );
}

/// The last chunk of a file may come on a stripe while the session's own stream has
/// nothing more to send until that chunk is acknowledged (its commit waits for it). The
/// stripe's chunk must still reach the session's worker: a session's own stream never
/// holds the worker's inbox while it waits for its next frame (it did, and such a file
/// stalled until `limits.stream_idle_timeout`). Driven frame by frame, so that the order
/// is certain.
#[test]
fn a_last_chunk_on_a_stripe_is_acknowledged_while_the_own_stream_waits() {
    use skyferry_common::chunk::{chunk_value, ChunkLayout};
    use skyferry_common::protocol::{
        Attach, Chunk, Codec, Commit, Lane, Message, Offer, MAX_CONTROL_FRAME,
    };
    use skyferry_common::wire::FrameReader;
    use skyferry_tests::hostile::{send_frame, Hostile};

    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let identity = pair.issue_agent_identity("kiso-02").expect("identity");
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], pair.port()));
    let ca = pair.certs_dir().join("ca.pem");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let chunk_size = CHUNK as u32;
    let data = content(10 * CHUNK + 1000, 91);
    let layout = ChunkLayout::new(data.len() as u64, chunk_size);
    let last = layout.count() - 1;
    let chunk = |index: u32| {
        let at = layout.offset(index) as usize;
        let raw = &data[at..at + layout.len(index).expect("in the file") as usize];
        Message::Chunk(Chunk {
            index,
            codec: Codec::Raw,
            raw_len: raw.len() as u32,
            chunk_hash: chunk_value(&layout, index, raw),
            payload: bytes::Bytes::copy_from_slice(raw),
        })
    };
    let path = "striped/last-on-a-stripe.fits";
    let stored_path = runtime.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let agent = Hostile::new(server, &ca, &identity, "kiso-02").expect("client");
        let lane = |index| Lane {
            instance: 7,
            index,
            count: 2,
        };
        let own = agent
            .connect_lane(&stop, Some(lane(0)))
            .await
            .expect("lane 0");
        let other = agent
            .connect_lane(&stop, Some(lane(1)))
            .await
            .expect("lane 1");
        let (mut send, recv) = own.open_bi().await.expect("file stream");
        let mut replies = FrameReader::new(recv, MAX_CONTROL_FRAME);
        let offer = Message::Offer(Offer {
            path: path.into(),
            size: data.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            file_hash: Some(*blake3::hash(&data).as_bytes()),
            chunk_size,
        });
        send_frame(&mut send, &offer).await.expect("offer");
        let resume = next_frame(&mut replies, "the offer").await;
        assert_eq!(resume.kind(), "resume", "{resume:?}");
        for index in 0..last {
            send_frame(&mut send, &chunk(index)).await.expect("chunk");
        }
        for index in 0..last {
            match next_frame(&mut replies, "a chunk on the own stream").await {
                Message::ChunkAck(a) => assert_eq!(a.index, index),
                other => panic!("chunk {index}: {other:?}"),
            }
        }
        // The session's own stream has taken every frame it was sent and waits for more.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let (mut stripe, recv) = other.open_bi().await.expect("stripe stream");
        let mut stripe_replies = FrameReader::new(recv, MAX_CONTROL_FRAME);
        let attach = Message::Attach(Attach { path: path.into() });
        send_frame(&mut stripe, &attach).await.expect("attach");
        let attached = next_frame(&mut stripe_replies, "the attach").await;
        assert_eq!(attached.kind(), "attached", "{attached:?}");
        send_frame(&mut stripe, &chunk(last))
            .await
            .expect("last chunk");
        match next_frame(&mut stripe_replies, "the last chunk, on the stripe").await {
            Message::ChunkAck(a) => assert_eq!(a.index, last, "the stripe's chunk"),
            other => panic!("the stripe's chunk: {other:?}"),
        }

        let commit = Message::Commit(Commit {
            chunks_sent: layout.count(),
            file_hash: *blake3::hash(&data).as_bytes(),
        });
        send_frame(&mut send, &commit).await.expect("commit");
        let verdict = next_frame(&mut replies, "the commit").await;
        stop.cancel();
        match verdict {
            Message::Ack(a) => a.stored_path,
            other => panic!("the commit: {other:?}"),
        }
    });
    assert_eq!(stored_path, path);
    let stored = fs::read(pair.storage().join("kiso-02").join(path)).expect("stored file");
    assert!(stored == data, "{path}: the stored bytes equal the file's");
}

/// The next frame of a reply stream, within 10 s.
async fn next_frame(
    reader: &mut skyferry_common::wire::FrameReader,
    what: &str,
) -> skyferry_common::protocol::Message {
    tokio::time::timeout(Duration::from_secs(10), reader.read())
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}
