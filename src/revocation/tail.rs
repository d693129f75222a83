//! Follows the Redis log into the map: at start every live entry (catching
//! up in batches), then each new one as Redis appends it (a blocking read,
//! so a sign-out on another replica arrives within a round trip).
//!
//! Each pass also checks the log's epoch. A new epoch means the log was
//! lost (Redis restarted without persistence, or evicted the keys); so does
//! a log whose last id is below what was read (restored from an older
//! snapshot, or a failover to a lagging replica). Either is logged as an
//! error and counted, and every replica writes each watermark it holds back
//! into the log, so the fleet loses only what no running replica had.
//! Watermarks Redis failed to take are retried here too; a failed write is
//! retried on the next pass, without dropping the reading connection.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Shared, cursor::Epoch, cursor::Position, now_millis, now_secs, store::READ_BATCH,
    store::RedisLog, watermarks::Revocation,
};
use crate::redis::RedisCallError;

/// How long one read waits for a new entry: also how often the epoch is
/// checked while the log is quiet.
const BLOCK: Duration = Duration::from_secs(1);

/// What the follower knows between reconnections.
#[derive(Debug, Default)]
struct Progress {
    /// The last entry applied.
    cursor: Position,
    /// The epoch the map's positions belong to.
    epoch: Option<Epoch>,
    /// The log was lost: this replica's whole map is to be written back.
    rewrite: bool,
    /// A write-back failed and was warned about: the next failures are
    /// debug lines until one succeeds.
    write_failing: bool,
    caught_up: bool,
}

/// Runs until the service is dropped.
pub(super) async fn follow(shared: Weak<Shared>, log: RedisLog, reconnect_every: Duration) {
    // The client connects in the background; calls before that would only
    // count connection errors that are not.
    let _ = log.redis().connected_watch().wait_for(|c| *c).await;
    let mut progress = Progress::default();
    let mut warned = false;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let error = strong.follow_once(&log, &mut progress).await;
        strong.log_healthy.store(false, Ordering::Release);
        if progress.caught_up {
            // It had worked: this is a new outage, worth a warning again.
            warned = false;
            progress.caught_up = false;
            strong.caught_up.send_replace(false);
            strong.metrics.caught_up.set(0);
        }
        if !warned {
            tracing::warn!(%error, retry_every = ?reconnect_every, "revocation log: Redis failed; \
                watermarks from other replicas are not arriving, and those recorded here are held and retried");
            warned = true;
        } else {
            tracing::debug!(%error, "revocation log: still failing");
        }
        drop(strong);
        tokio::time::sleep(reconnect_every).await;
    }
}

impl Shared {
    /// One connection's worth of following; returns why it stopped.
    async fn follow_once(&self, log: &RedisLog, progress: &mut Progress) -> RedisCallError {
        let connection = match log.redis().connect_for_blocking_reads().await {
            Ok(connection) => connection,
            Err(error) => return error,
        };
        loop {
            if let Err(error) = self.check_epoch(log, progress).await {
                return error;
            }
            // Every pass, not only at reconnection: one write to a log that
            // went back would soon lift its last id above every cursor.
            if let Err(error) = self.check_last_id(log, progress).await {
                return error;
            }
            self.write_back(log, progress).await;
            let block = progress.caught_up.then_some(BLOCK);
            let (entries, last) = match log.read_after(&connection, progress.cursor, block).await {
                Ok(read) => read,
                Err(error) => return error,
            };
            let count = entries.len();
            self.log_healthy.store(true, Ordering::Release);
            self.apply(entries, progress.caught_up);
            if let Some(last) = last {
                progress.cursor = last;
            }
            if !progress.caught_up && count < READ_BATCH {
                progress.caught_up = true;
                self.caught_up.send_replace(true);
                self.metrics.caught_up.set(1);
                tracing::info!(
                    watermarks = self.watermarks.len(),
                    "revocation log: caught up; following it"
                );
            }
        }
    }

    /// Learns the epoch; a different one than before means the log was
    /// lost.
    async fn check_epoch(
        &self,
        log: &RedisLog,
        progress: &mut Progress,
    ) -> Result<(), RedisCallError> {
        let epoch = log.epoch().await?;
        let lost = match &progress.epoch {
            Some(known) if *known == epoch => return Ok(()),
            Some(known) => {
                tracing::error!(
                    lost = known.as_str(),
                    new = epoch.as_str(),
                    held_here = self.watermarks.len(),
                    "revocation log: Redis lost the revocation watermarks (restarted without \
                     persistence, or keys evicted); writing them back from the replicas"
                );
                true
            }
            None => false,
        };
        // The new epoch first: a watcher that starts after the reset must
        // not pair the old epoch with positions of the new log.
        self.epoch.store(Some(Arc::new(epoch.clone())));
        progress.epoch = Some(epoch.clone());
        if lost {
            self.lost(progress);
        }
        Ok(())
    }

    /// A log whose last id is below the cursor lost its latest entries,
    /// though its epoch survived.
    async fn check_last_id(
        &self,
        log: &RedisLog,
        progress: &mut Progress,
    ) -> Result<(), RedisCallError> {
        let last = log.last_generated().await?;
        if last >= progress.cursor {
            return Ok(());
        }
        tracing::error!(
            read_up_to = %progress.cursor,
            log_ends_at = %last,
            held_here = self.watermarks.len(),
            "revocation log: Redis lost the latest revocation watermarks (restored from an \
             older snapshot, or failed over to a lagging replica); writing them back from \
             the replicas"
        );
        self.lost(progress);
        Ok(())
    }

    /// The log lost entries: counted, watchers told to start over, read
    /// again from its start, and the map to be written back.
    fn lost(&self, progress: &mut Progress) {
        self.metrics.resets.inc();
        self.watermarks.reset_positions();
        progress.cursor = Position::default();
        // Every replica writes back what it holds. Letting one claim it
        // lost what the others held when the claimer was still loading or
        // stopped half-way; a value already there comes back `kept` and
        // logs nothing, so the cost is Redis's, once per loss.
        progress.rewrite = true;
    }

    /// Writes back what the log lacks: everything after a loss, and the
    /// watermarks Redis did not confirm.
    /// A failure is logged and left for the next pass: the reads go on.
    async fn write_back(&self, log: &RedisLog, progress: &mut Progress) {
        let Some(epoch) = progress.epoch.clone() else {
            return;
        };
        match self.write_back_once(log, &epoch, progress).await {
            Ok(()) => progress.write_failing = false,
            Err(error) if !progress.write_failing => {
                tracing::warn!(%error, "revocation log: writing back failed; retried on the next pass");
                progress.write_failing = true;
            }
            Err(error) => tracing::debug!(%error, "revocation log: writing back still fails"),
        }
    }

    async fn write_back_once(
        &self,
        log: &RedisLog,
        epoch: &Epoch,
        progress: &mut Progress,
    ) -> Result<(), RedisCallError> {
        if progress.rewrite {
            let now = now_secs();
            let live: Vec<_> = self
                .watermarks
                .all()
                .into_iter()
                .filter(|(_, _, before)| self.watermarks.expires_at(*before) > now)
                .collect();
            let started = Instant::now();
            let added = log.record_many(epoch, &live).await?;
            tracing::warn!(
                held = live.len(),
                added,
                took = ?started.elapsed(),
                "revocation log: watermarks written back"
            );
            progress.rewrite = false;
        }
        let pending = self.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        match log.record_many(epoch, &pending).await {
            Ok(added) => {
                self.metrics.pending.set(0);
                tracing::info!(
                    held = pending.len(),
                    added,
                    "revocation log: held watermarks written"
                );
                Ok(())
            }
            Err(error) => {
                for (pool, sub, before) in pending {
                    self.hold(&pool, &sub, before);
                }
                Err(error)
            }
        }
    }

    fn apply(&self, entries: Vec<Revocation>, live_tail: bool) {
        let now = now_secs();
        let now_ms = now_millis();
        for entry in entries {
            // Trimming is approximate, and a quiet log is not trimmed.
            if self.watermarks.expires_at(entry.revoked_before) <= now {
                continue;
            }
            if live_tail {
                #[allow(clippy::cast_precision_loss)] // milliseconds: f64 is exact enough
                let lag = now_ms.saturating_sub(entry.position.ms) as f64 / 1000.0;
                self.metrics.lag.observe(lag);
            }
            self.watermarks.apply_logged(entry);
        }
        self.metrics.live.set(self.watermarks.len());
    }
}
