use super::*;

#[test]
fn ledger_entries_round_trip_and_spread() {
    let e = entry(Table::Pairs, "ward-01\u{0}it/browser", b"\x01\x02");
    assert_eq!(
        unentry(&e),
        Some((
            Table::Pairs,
            "ward-01\u{0}it/browser".to_string(),
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
