//! Every live watermark, in this process's memory, so that VerifyToken
//! checks one without a network round trip. Entries are sharded (readers
//! never wait on a whole-map lock) and small: a Cognito `sub` is a UUID and
//! is kept as 16 bytes, with the pool as an index.
//!
//! Entries that came through the revocation log carry their position in
//! it; [`Watermarks::apply_logged`] is called in log order by one task, and
//! publishes each entry to watchers in that order, so a watcher's cursor
//! never skips an entry.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicI64, Ordering},
    },
};

use tokio::sync::broadcast;

use super::cursor::Position;
use crate::domain::UserPoolId;

/// Shards of the map: enough that a sweep or a bulk load holding one never
/// stalls verifications on the others.
const SHARDS: usize = 16;

/// Watchers may fall this far behind the log before they re-read the map.
const EVENT_BUFFER: usize = 4096;

/// One watermark as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The pool.
    pub pool: UserPoolId,
    /// The user's `sub`.
    pub sub: String,
    /// Tokens with `auth_time` at or before this (seconds) are revoked.
    pub revoked_before: i64,
    /// Where the log holds it.
    pub position: Position,
}

/// What watchers are told, in log order.
#[derive(Debug, Clone)]
pub enum LogEvent {
    /// A watermark was recorded or raised.
    Revoked(Arc<Revocation>),
    /// The log was lost and is being rebuilt under a new epoch: positions
    /// seen so far mean nothing any more.
    Reset,
}

/// A prefix of the log, in order; iterating yields its watermarks.
#[derive(Debug)]
pub struct Snapshot {
    pools: Vec<UserPoolId>,
    entries: std::vec::IntoIter<(Position, u32, SubKey, i64)>,
    /// Where the prefix ends: a watcher goes on from here.
    pub end: Position,
}

impl Iterator for Snapshot {
    type Item = Revocation;

    fn next(&mut self) -> Option<Revocation> {
        let (position, pool, sub, revoked_before) = self.entries.next()?;
        Some(Revocation {
            pool: self.pools[pool as usize].clone(),
            sub: sub.to_sub(),
            revoked_before,
            position,
        })
    }
}

/// A `sub`: 16 bytes when it is a lowercase hyphenated UUID (Cognito's
/// form), the string itself otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubKey {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl SubKey {
    fn new(sub: &str) -> Self {
        parse_uuid(sub).map_or_else(|| Self::Other(sub.into()), Self::Uuid)
    }

    fn to_sub(&self) -> String {
        match self {
            Self::Uuid(bytes) => format_uuid(bytes),
            Self::Other(sub) => sub.to_string(),
        }
    }
}

/// 16 bytes, 4-aligned, so that a bucket with its 20-byte UUID key is 36
/// bytes (an `i64` and an `Option<Position>` made it 56: P9 measured 122
/// bytes a watermark at 1 M).
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Seconds since the epoch (enough until 2106).
    revoked_before: u32,
    /// The log position's milliseconds, split; 0 until the entry comes back
    /// through the log.
    ms_high: u32,
    ms_low: u32,
    seq: u32,
}

impl Entry {
    const EMPTY: Self = Self {
        revoked_before: 0,
        ms_high: 0,
        ms_low: 0,
        seq: 0,
    };

    fn revoked_before(self) -> i64 {
        i64::from(self.revoked_before)
    }

    /// Raises the watermark (clamped to what fits) and says whether it moved.
    fn raise(&mut self, revoked_before: i64) -> bool {
        let clamped = u32::try_from(revoked_before.max(0)).unwrap_or(u32::MAX);
        let raised = clamped > self.revoked_before;
        self.revoked_before = self.revoked_before.max(clamped);
        raised
    }

    fn position(self) -> Option<Position> {
        let ms = (u64::from(self.ms_high) << 32) | u64::from(self.ms_low);
        (ms != 0).then_some(Position {
            ms,
            seq: u64::from(self.seq),
        })
    }

    /// Positions whose seq does not fit (over 4 billion entries in one
    /// millisecond) keep the largest that does: still after the ones before.
    fn set_position(&mut self, position: Option<Position>) {
        let Some(position) = position else {
            (self.ms_high, self.ms_low, self.seq) = (0, 0, 0);
            return;
        };
        #[allow(clippy::cast_possible_truncation)] // the halves of a u64
        {
            self.ms_high = (position.ms >> 32) as u32;
            self.ms_low = position.ms as u32;
        }
        self.seq = u32::try_from(position.seq).unwrap_or(u32::MAX);
    }
}

#[derive(Debug, Default)]
struct Shard {
    // Two maps rather than one keyed by `SubKey`: a UUID entry then costs
    // a 20-byte key instead of a 32-byte enum.
    uuids: HashMap<(u32, [u8; 16]), Entry>,
    others: HashMap<(u32, Box<str>), Entry>,
}

impl Shard {
    fn get(&self, pool: u32, sub: &SubKey) -> Option<&Entry> {
        match sub {
            SubKey::Uuid(bytes) => self.uuids.get(&(pool, *bytes)),
            SubKey::Other(other) => self.others.get(&(pool, other.clone())),
        }
    }

    /// The entry, created if absent; true when it was created.
    fn entry(&mut self, pool: u32, sub: SubKey) -> (&mut Entry, bool) {
        let empty = Entry::EMPTY;
        let (entry, created) = match sub {
            SubKey::Uuid(bytes) => {
                let slot = self.uuids.entry((pool, bytes));
                let created = matches!(slot, std::collections::hash_map::Entry::Vacant(_));
                (slot.or_insert(empty), created)
            }
            SubKey::Other(other) => {
                let slot = self.others.entry((pool, other));
                let created = matches!(slot, std::collections::hash_map::Entry::Vacant(_));
                (slot.or_insert(empty), created)
            }
        };
        (entry, created)
    }
}

/// The map; one per process, shared by VerifyToken, the recorder, the log
/// tail and the watchers.
#[derive(Debug)]
pub struct Watermarks {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// Pools by index; a handful per deployment, never removed.
    pools: RwLock<Vec<UserPoolId>>,
    live: AtomicI64,
    /// Seconds a watermark stays after `revoked_before`.
    ttl_secs: i64,
    events: broadcast::Sender<LogEvent>,
    /// The last position applied: every logged entry at or before it is in
    /// the map. Set after the map, so a snapshot taken up to it is a prefix
    /// of the log (the shards are read one at a time while entries keep
    /// coming; without it a snapshot could hold a later entry and miss an
    /// earlier one in a shard read before it).
    applied: Mutex<Position>,
}

impl Watermarks {
    /// Watermarks are forgotten `ttl_secs` after their `revoked_before`.
    pub fn new(ttl_secs: i64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            pools: RwLock::default(),
            live: AtomicI64::new(0),
            ttl_secs,
            events: broadcast::channel(EVENT_BUFFER).0,
            applied: Mutex::default(),
        }
    }

    /// True when `sub` of `pool` signed in (`auth_time`) at or before their
    /// watermark.
    pub fn is_revoked(&self, pool: &UserPoolId, sub: &str, auth_time: i64) -> bool {
        let Some(pool) = self.pool_index(pool) else {
            return false;
        };
        let sub = SubKey::new(sub);
        read(self.shard(&sub))
            .get(pool, &sub)
            .is_some_and(|entry| auth_time <= entry.revoked_before())
    }

    /// Raises the watermark as this replica records it, before the log has
    /// it: VerifyToken here sees it at once; watchers see it when the log
    /// hands it back. True when it moved.
    pub fn raise(&self, pool: &UserPoolId, sub: &str, revoked_before: i64) -> bool {
        let pool = self.pool_index_or_insert(pool);
        let sub = SubKey::new(sub);
        let mut shard = write(self.shard(&sub));
        let (entry, created) = shard.entry(pool, sub);
        if created {
            self.live.fetch_add(1, Ordering::Relaxed);
        }
        entry.raise(revoked_before)
    }

    /// Applies an entry read from the log and tells the watchers. Called in
    /// log order, by one task at a time.
    pub fn apply_logged(&self, revocation: Revocation) {
        let pool = self.pool_index_or_insert(&revocation.pool);
        let sub = SubKey::new(&revocation.sub);
        let event = {
            let mut shard = write(self.shard(&sub));
            let (entry, created) = shard.entry(pool, sub);
            if created {
                self.live.fetch_add(1, Ordering::Relaxed);
            }
            entry.raise(revocation.revoked_before);
            entry.set_position(Some(revocation.position));
            // The map first, then `applied`, then the event: a watcher
            // subscribed before reading `applied` gets every later entry as
            // an event, and finds every earlier one in the map.
            Revocation {
                revoked_before: entry.revoked_before(),
                ..revocation
            }
        };
        *lock(&self.applied) = event.position;
        // Nobody listening is fine.
        let _ = self.events.send(LogEvent::Revoked(Arc::new(event)));
    }

    /// The log was lost: every position is forgotten (the entries stay and
    /// are checked as before) and watchers are told to start over.
    pub fn reset_positions(&self) {
        *lock(&self.applied) = Position::default();
        for shard in &*self.shards {
            let mut shard = write(shard);
            for entry in shard.uuids.values_mut() {
                entry.set_position(None);
            }
            for entry in shard.others.values_mut() {
                entry.set_position(None);
            }
        }
        let _ = self.events.send(LogEvent::Reset);
    }

    /// Log events from now on. Subscribe before taking a snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<LogEvent> {
        self.events.subscribe()
    }

    /// The logged entries of `pools` (all pools when `None`) after `after`
    /// and up to the last applied position, in log order: a prefix of the
    /// log. Subscribe first; entries after the snapshot's end arrive as
    /// events. Compact (about 48 bytes an entry); made into [`Revocation`]s
    /// one at a time as they are sent.
    pub fn snapshot(&self, pools: Option<&[UserPoolId]>, after: Option<Position>) -> Snapshot {
        let end = *lock(&self.applied);
        let wanted: Option<Vec<u32>> =
            pools.map(|pools| pools.iter().filter_map(|p| self.pool_index(p)).collect());
        let keep = |pool: u32, entry: &Entry| {
            wanted.as_ref().is_none_or(|w| w.contains(&pool))
                && entry
                    .position()
                    .is_some_and(|p| p <= end && after.is_none_or(|after| p > after))
        };
        let mut entries: Vec<(Position, u32, SubKey, i64)> = Vec::new();
        for shard in &*self.shards {
            let shard = read(shard);
            for ((pool, bytes), entry) in &shard.uuids {
                if keep(*pool, entry) {
                    let position = entry.position().unwrap_or_default();
                    entries.push((
                        position,
                        *pool,
                        SubKey::Uuid(*bytes),
                        entry.revoked_before(),
                    ));
                }
            }
            for ((pool, sub), entry) in &shard.others {
                if keep(*pool, entry) {
                    let position = entry.position().unwrap_or_default();
                    entries.push((
                        position,
                        *pool,
                        SubKey::Other(sub.clone()),
                        entry.revoked_before(),
                    ));
                }
            }
        }
        entries.sort_unstable_by_key(|(position, ..)| *position);
        Snapshot {
            pools: read(&self.pools).clone(),
            entries: entries.into_iter(),
            end: after.map_or(end, |after| after.max(end)),
        }
    }

    /// [`Self::snapshot`] made whole, for tests.
    #[cfg(test)]
    pub fn logged_since(
        &self,
        pools: Option<&[UserPoolId]>,
        after: Option<Position>,
    ) -> Vec<Revocation> {
        self.snapshot(pools, after).collect()
    }

    /// Every entry (pool, sub, watermark), to write back into a log that
    /// was lost.
    pub fn all(&self) -> Vec<(UserPoolId, String, i64)> {
        let pools = read(&self.pools).clone();
        let mut all = Vec::new();
        for shard in &*self.shards {
            let shard = read(shard);
            all.extend(shard.uuids.iter().map(|((pool, bytes), entry)| {
                (
                    pools[*pool as usize].clone(),
                    format_uuid(bytes),
                    entry.revoked_before(),
                )
            }));
            all.extend(shard.others.iter().map(|((pool, sub), entry)| {
                (
                    pools[*pool as usize].clone(),
                    sub.to_string(),
                    entry.revoked_before(),
                )
            }));
        }
        all
    }

    /// Forgets watermarks whose every token has expired by `now` (seconds).
    /// Returns how many went.
    pub fn sweep(&self, now: i64) -> usize {
        let live = |entry: &Entry| self.expires_at(entry.revoked_before()) > now;
        let mut removed = 0;
        for shard in &*self.shards {
            let mut shard = write(shard);
            let before = shard.uuids.len() + shard.others.len();
            shard.uuids.retain(|_, entry| live(entry));
            shard.others.retain(|_, entry| live(entry));
            removed += before - shard.uuids.len() - shard.others.len();
        }
        self.live.fetch_sub(
            i64::try_from(removed).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        removed
    }

    /// Watermarks held now.
    pub fn len(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }

    /// True when none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When a watermark taken at `revoked_before` is forgotten (seconds):
    /// every token it revokes has expired by then.
    pub fn expires_at(&self, revoked_before: i64) -> i64 {
        revoked_before.saturating_add(self.ttl_secs)
    }

    fn shard(&self, sub: &SubKey) -> &RwLock<Shard> {
        // The modulo keeps the index below SHARDS, which fits in usize.
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(sub) % SHARDS as u64) as usize;
        &self.shards[index]
    }

    fn pool_index(&self, pool: &UserPoolId) -> Option<u32> {
        read(&self.pools)
            .iter()
            .position(|known| known == pool)
            .and_then(|index| u32::try_from(index).ok())
    }

    fn pool_index_or_insert(&self, pool: &UserPoolId) -> u32 {
        if let Some(index) = self.pool_index(pool) {
            return index;
        }
        let mut pools = write(&self.pools);
        let index = pools
            .iter()
            .position(|known| known == pool)
            .unwrap_or_else(|| {
                pools.push(pool.clone());
                pools.len() - 1
            });
        u32::try_from(index).expect("fewer than 2^32 pools")
    }
}

// Nothing panics while holding these locks; recover the data if it did.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The 16 bytes of a lowercase hyphenated UUID; `None` for anything whose
/// formatting would not give the same string back.
fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        if matches!(index, 8 | 13 | 18 | 23) {
            if byte != b'-' {
                return None;
            }
            continue;
        }
        let value = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            _ => return None,
        };
        out[nibbles / 2] |= if nibbles % 2 == 0 { value << 4 } else { value };
        nibbles += 1;
    }
    Some(out)
}

fn format_uuid(bytes: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

#[cfg(test)]
#[path = "watermarks_tests.rs"]
mod tests;
