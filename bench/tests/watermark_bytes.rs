//! P9's memory figure in-process: heap bytes the watermark map holds per
//! entry, counted by the allocator (no RSS, no allocator caching), for the
//! map sizes given. `scripts/bench --only p9` measures the whole service;
//! this tells the map's own share apart. A million entries is slow in a
//! debug build, so that size is ignored by default:
//!
//! ```sh
//! cargo test --release -p session-service-bench --test watermark_bytes -- --include-ignored --nocapture
//! ```

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use session_service::{
    domain::UserPoolId,
    revocation::{
        Position, Revocation,
        watermarks::Watermarks,
    },
};

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes per entry of a map loaded with `count` UUID subs of one pool,
/// as the log's follower loads it.
fn bytes_per_entry(count: u64) -> f64 {
    let pool = UserPoolId::parse("us-east-1_BenchPool1".to_owned()).expect("pool id");
    let watermarks = Watermarks::new(86_400);
    let before = LIVE.load(Ordering::SeqCst);
    for i in 0..count {
        watermarks.apply_logged(Revocation {
            pool: pool.clone(),
            sub: format!(
                "{:08x}-0000-4000-b000-{:012x}",
                i.wrapping_mul(0x9e37_79b9) & 0xffff_ffff,
                i
            ),
            revoked_before: 1_700_000_000,
            position: Position { ms: 1_700_000_000_000 + i, seq: 0 },
        });
    }
    let held = LIVE.load(Ordering::SeqCst) - before;
    assert_eq!(watermarks.len(), i64::try_from(count).expect("count"));
    let per_entry = held as f64 / count as f64;
    println!("{count} watermarks: {held} heap bytes, {per_entry:.1} B per entry");
    per_entry
}

#[test]
fn twenty_thousand_watermarks() {
    bytes_per_entry(20_000);
}

#[test]
#[ignore = "slow in debug builds: run with --release --include-ignored"]
fn a_million_watermarks() {
    bytes_per_entry(1_000_000);
}
