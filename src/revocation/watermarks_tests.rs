use std::sync::Arc;

use super::*;

const ALICE: &str = "8f3c2a10-5b7d-4e21-9a0c-1d2e3f405162";
const BOB: &str = "0a1b2c3d-4e5f-4061-8293-a4b5c6d7e8f9";

fn pool(name: &str) -> UserPoolId {
    UserPoolId::parse(name).expect("as set up")
}

fn logged(pool_id: &str, sub: &str, revoked_before: i64, ms: u64) -> Revocation {
    Revocation {
        pool: pool(pool_id),
        sub: sub.to_owned(),
        revoked_before,
        position: Position { ms, seq: 0 },
    }
}

#[test]
fn uuids_are_kept_as_bytes_and_read_back_exactly() {
    let bytes = parse_uuid(ALICE).expect("as set up");
    assert_eq!(format_uuid(&bytes), ALICE);
    // Forms that would not format back the same are kept as strings.
    for other in [
        "8F3C2A10-5B7D-4E21-9A0C-1D2E3F405162",
        "8f3c2a105b7d4e219a0c1d2e3f405162",
        "8f3c2a10-5b7d-4e21-9a0c-1d2e3f40516",
        "8f3c2a10_5b7d-4e21-9a0c-1d2e3f405162",
        "alice",
    ] {
        assert!(parse_uuid(other).is_none(), "{other}");
        assert_eq!(SubKey::new(other).to_sub(), other);
    }
}

#[test]
fn a_token_signed_in_at_or_before_the_watermark_is_revoked() {
    let marks = Watermarks::new(86_400);
    let eu = pool("eu-west-1_abc");
    assert!(!marks.is_revoked(&eu, ALICE, 100));
    assert!(marks.raise(&eu, ALICE, 100));
    assert!(marks.is_revoked(&eu, ALICE, 99));
    assert!(marks.is_revoked(&eu, ALICE, 100));
    assert!(!marks.is_revoked(&eu, ALICE, 101), "signed in after");
    assert!(!marks.is_revoked(&eu, BOB, 50), "another user");
    assert!(
        !marks.is_revoked(&pool("us-east-1_abc"), ALICE, 50),
        "the same sub in another pool"
    );
    // Non-UUID subs work the same.
    marks.raise(&eu, "plain-sub", 10);
    assert!(marks.is_revoked(&eu, "plain-sub", 10));
    assert_eq!(marks.len(), 2);
}

#[test]
fn a_watermark_only_moves_forward() {
    let marks = Watermarks::new(86_400);
    let eu = pool("eu-west-1_abc");
    assert!(marks.raise(&eu, ALICE, 200));
    assert!(!marks.raise(&eu, ALICE, 150), "lower: kept");
    assert!(marks.is_revoked(&eu, ALICE, 200));
    marks.apply_logged(logged("eu-west-1_abc", ALICE, 120, 1));
    assert!(marks.is_revoked(&eu, ALICE, 200), "an older log entry");
    let snapshot = marks.logged_since(None, None);
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].revoked_before, 200, "watchers get the highest");
    assert_eq!(marks.len(), 1);
}

#[test]
fn watchers_get_logged_entries_in_log_order_and_only_those() {
    let marks = Watermarks::new(86_400);
    let mut events = marks.subscribe();
    let eu = pool("eu-west-1_abc");
    marks.raise(&eu, "raised-here-only", 10);
    marks.apply_logged(logged("eu-west-1_abc", BOB, 20, 3));
    marks.apply_logged(logged("us-east-1_abc", ALICE, 30, 4));
    marks.apply_logged(logged("eu-west-1_abc", ALICE, 40, 5));

    let all = marks.logged_since(None, None);
    let order: Vec<_> = all
        .iter()
        .map(|r| (r.sub.as_str(), r.position.ms))
        .collect();
    assert_eq!(order, [(BOB, 3), (ALICE, 4), (ALICE, 5)]);
    let eu_only = marks.logged_since(Some(std::slice::from_ref(&eu)), None);
    assert_eq!(eu_only.len(), 2);
    let after = marks.logged_since(Some(&[eu]), Some(Position { ms: 3, seq: 0 }));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].sub, ALICE);
    assert_eq!(after[0].revoked_before, 40);

    for expected in [3, 4, 5] {
        match events.try_recv().expect("as set up") {
            LogEvent::Revoked(revocation) => assert_eq!(revocation.position.ms, expected),
            LogEvent::Reset => panic!("no reset"),
        }
    }
    assert!(events.try_recv().is_err(), "a local raise is not an event");
}

#[test]
fn a_reset_forgets_positions_but_keeps_the_watermarks() {
    let marks = Watermarks::new(86_400);
    let eu = pool("eu-west-1_abc");
    marks.apply_logged(logged("eu-west-1_abc", ALICE, 40, 5));
    let mut events = marks.subscribe();
    marks.reset_positions();
    assert!(matches!(events.try_recv(), Ok(LogEvent::Reset)));
    assert!(marks.logged_since(None, None).is_empty());
    assert!(marks.is_revoked(&eu, ALICE, 40));
    assert_eq!(marks.all(), [(eu, ALICE.to_owned(), 40)]);
}

#[test]
fn the_sweep_forgets_only_what_has_expired() {
    let marks = Watermarks::new(100);
    let eu = pool("eu-west-1_abc");
    marks.raise(&eu, ALICE, 1_000);
    marks.raise(&eu, BOB, 1_050);
    marks.raise(&eu, "plain", 1_000);
    assert_eq!(marks.sweep(1_099), 0);
    assert_eq!(marks.sweep(1_100), 2);
    assert!(!marks.is_revoked(&eu, ALICE, 0));
    assert!(marks.is_revoked(&eu, BOB, 0));
    assert_eq!(marks.len(), 1);
}

#[test]
fn a_uuid_bucket_is_36_bytes_and_positions_read_back() {
    assert_eq!(std::mem::size_of::<((u32, [u8; 16]), Entry)>(), 36);
    let mut entry = Entry::EMPTY;
    assert_eq!(entry.position(), None);
    let position = Position {
        ms: 1_733_333_333_333,
        seq: 7,
    };
    entry.set_position(Some(position));
    assert_eq!(entry.position(), Some(position));
    assert!(entry.raise(1_733_333_333));
    assert!(!entry.raise(1_733_333_000));
    assert_eq!(entry.revoked_before(), 1_733_333_333);
}

#[test]
fn a_snapshot_taken_while_entries_arrive_is_a_prefix_of_the_log() {
    // One thread applies entries in log order while snapshots are taken:
    // each must hold every entry up to its end, none after.
    let marks = Arc::new(Watermarks::new(86_400));
    let total: u64 = 50_000;
    let writer = {
        let marks = marks.clone();
        std::thread::spawn(move || {
            for ms in 1..=total {
                marks.apply_logged(logged("eu-west-1_abc", &format!("user-{ms}"), 10, ms));
            }
        })
    };
    let mut checked = 0;
    while !writer.is_finished() || checked == 0 {
        let snapshot = marks.snapshot(None, None);
        let end = snapshot.end.ms;
        let positions: Vec<u64> = snapshot.map(|r| r.position.ms).collect();
        assert_eq!(positions.len() as u64, end, "a gap before {end}");
        assert!(positions.iter().copied().eq(1..=end));
        checked += 1;
    }
    writer.join().expect("the writer");
    assert_eq!(marks.snapshot(None, None).count() as u64, total);
}
