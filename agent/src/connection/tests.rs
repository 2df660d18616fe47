use super::*;

#[test]
fn backoff_grows_and_is_capped() {
    assert_eq!(backoff(0, 0.0), Duration::from_millis(200));
    assert_eq!(backoff(1, 0.0), Duration::from_millis(400));
    assert_eq!(backoff(3, 1.0), Duration::from_millis(2400));
    assert_eq!(backoff(20, 0.0), Duration::from_secs(30));
    assert_eq!(backoff(20, 1.0), Duration::from_secs(45));
}
