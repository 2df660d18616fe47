use super::*;
use tenet_protocol::session::SharedBytes;

fn dispatch(bundle: &SharedBytes) -> ToAgent {
    ToAgent::Dispatch {
        envelope: vec![0; 1000],
        bundle: bundle.clone(),
    }
}

#[tokio::test]
async fn a_session_queue_is_bounded_in_bytes_and_shares_bundles() {
    // 10 MiB bundle, 4 KiB of room: a bundle is counted once per message
    // as its envelope only, because every message shares one copy.
    let bundle = SharedBytes::new(vec![7; 10 << 20]);
    let (tx, mut rx) = SessionTx::channel(64, 4096);
    let mut queued = 0;
    while tx.try_send(dispatch(&bundle)).is_ok() {
        queued += 1;
    }
    assert_eq!(
        queued, 3,
        "3 x (1000 + 64) bytes fit in 4096, a 4th does not"
    );
    assert_eq!(tx.queued_bytes(), 3 * 1064);
    assert_eq!(
        std::sync::Arc::strong_count(&bundle.0),
        4,
        "one bundle, shared by the three queued messages"
    );
    // What the writer takes frees its room.
    assert!(matches!(rx.recv().await, Some(ToAgent::Dispatch { .. })));
    assert_eq!(tx.queued_bytes(), 2 * 1064);
    assert_eq!(tx.try_send(dispatch(&bundle)), Ok(()));
    // Bounded in messages too.
    let (tx, _rx) = SessionTx::channel(2, 1 << 20);
    assert_eq!(tx.try_send(ToAgent::Ping), Ok(()));
    assert_eq!(tx.try_send(ToAgent::Ping), Ok(()));
    assert_eq!(tx.try_send(ToAgent::Ping), Err(NotQueued));
    assert_eq!(tx.queued_bytes(), 128, "a refused message leaves no count");
}

#[test]
fn a_replaced_session_ends_and_its_end_changes_nothing() {
    let sessions = Sessions::default();
    let session = |id| {
        let (to_agent, _) = SessionTx::channel(1, 1024);
        Session {
            id,
            to_agent,
            replaced: Arc::new(Notify::new()),
            agent_version: "0.2.0".into(),
        }
    };
    let (older, newer) = (session(1), session(2));
    let older_replaced = older.replaced.clone();
    assert!(!sessions.insert("ward-01", older));
    assert!(sessions.insert("ward-01", newer));
    // The older one was told to end (the permit waits for its loop).
    let told = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), older_replaced.notified()).await
        });
    assert!(told.is_ok());
    assert!(
        !sessions.remove("ward-01", 1),
        "the older one's end is ignored"
    );
    assert_eq!(sessions.names(), vec!["ward-01".to_string()]);
    assert!(sessions.remove("ward-01", 2));
    assert!(sessions.is_empty());
}

/// A bundle is on offer to a session only once dispatched to it by digest,
/// answers one `Want` per offer, and at most the newest MAX_OFFERED are on
/// offer; an agent of 0.1 is sent the bundle whole instead.
#[test]
fn a_session_is_offered_only_the_bundles_dispatched_to_it_once_each() {
    use tenet_protocol::release::Release;
    let (tx, _rx) = SessionTx::channel(64, 1 << 30);
    let tx = tx.of_release(Release { major: 0, minor: 2 });
    let bundle = SharedBytes::new(vec![7; 100]);
    assert_eq!(tx.take_offered(&[1; 32]), None, "nothing offered yet");
    assert_eq!(tx.dispatch(vec![1], [1; 32], bundle.clone()), Ok(0));
    assert_eq!(tx.take_offered(&[2; 32]), None, "not that one");
    assert_eq!(tx.take_offered(&[1; 32]), Some(bundle.clone()));
    assert_eq!(tx.take_offered(&[1; 32]), None, "once per offer");
    for i in 0..=sessions::MAX_OFFERED as u8 {
        tx.dispatch(vec![i], [i + 10; 32], bundle.clone())
            .expect("queued");
    }
    assert_eq!(tx.take_offered(&[10; 32]), None, "the oldest went");
    assert!(tx.take_offered(&[11; 32]).is_some());
    let (old, _rx) = SessionTx::channel(64, 1 << 30);
    let old = old.of_release(Release { major: 0, minor: 1 });
    assert_eq!(old.dispatch(vec![1], [1; 32], bundle.clone()), Ok(100));
    assert_eq!(old.take_offered(&[1; 32]), None);
}
