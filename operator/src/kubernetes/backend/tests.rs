use super::*;

#[test]
fn ledger_entries_round_trip_and_spread() {
    let e = entry(Table::Pairs, "ward-01\u{0}it/browser", b"\x01\x02");
    assert_eq!(
        unentry(&e),
        Some(Change::put(
            Table::Pairs,
            "ward-01\u{0}it/browser",
            vec![1, 2]
        ))
    );
    assert_eq!(unentry(&[99, 0, 0]), None);
    assert_eq!(unentry(&[3, 0, 9, b'a']), None);
    // A thousand terminals' records land in (nearly) every shard.
    let shards: BTreeSet<usize> = (0..1000)
        .map(|i| slot(Table::Dispatches, &format!("t{i}\u{0}p")).0)
        .collect();
    assert_eq!(shards.len(), SHARDS);
}

/// A backend that writes through the runtime, as the Kubernetes one does.
struct ThroughRuntime {
    handle: tokio::runtime::Handle,
    stored: Arc<Mutex<Vec<Change>>>,
}

impl Backend for ThroughRuntime {
    fn load(&self) -> Result<Vec<Change>, StoreError> {
        Ok(Vec::new())
    }
    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        let (stored, batch) = (self.stored.clone(), batch.to_vec());
        wait_on(&self.handle, async move {
            tokio::task::yield_now().await;
            stored.lock().expect("lock").extend(batch);
            Ok(())
        })
    }
}

#[test]
fn a_store_dropped_on_a_runtime_worker_commits_instead_of_panicking() {
    // One worker: the drop blocks it, and the write must still run.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let stored = Arc::new(Mutex::new(Vec::new()));
    let backend = ThroughRuntime {
        handle: rt.handle().clone(),
        stored: stored.clone(),
    };
    let store = crate::store::Store::with_backend(Box::new(backend)).expect("open");
    assert_eq!(store.policy_generation("ns/p", [1; 32]), 1);
    // Dropped inside an async fn, on the runtime's only worker (with
    // `Handle::block_on` in the backend, this panicked: "Cannot start a
    // runtime from within a runtime").
    rt.block_on(async move {
        tokio::spawn(async move { drop(store) })
            .await
            .expect("the drop does not panic");
    });
    assert!(
        stored
            .lock()
            .expect("lock")
            .iter()
            .any(|c| c.table == Table::Policies && c.key == "ns/p"),
        "the change was committed at the drop"
    );
}
