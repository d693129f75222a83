//! WatchRevocations: the logged watermarks of some pools (all of them, or
//! those after the watcher's cursor), then each new one as the log hands it
//! over, in log order. A task per watcher, so a slow client never holds the
//! log's follower: when it falls further behind than the event buffer, it
//! re-reads the map from its last position, and loses nothing.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    Revocations, Shared,
    cursor::{Cursor, Epoch, Position},
    watermarks::{LogEvent, Revocation},
};
use crate::domain::UserPoolId;

/// Messages queued for one client before its task waits.
const CLIENT_BUFFER: usize = 256;

/// How long one snapshot message may wait for a client that does not
/// read: the snapshot's permit is held meanwhile, and two stalled clients
/// would otherwise hold every permit for good.
const SNAPSHOT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The watermark.
    pub revocation: Revocation,
    /// When the server forgets it (seconds).
    pub expires_at: i64,
    /// Where to resume after it.
    pub cursor: Cursor,
}

/// Why a stream ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchEnd {
    /// The log was lost and is being rebuilt: reconnect with the cursor.
    #[error("the revocation log was reset; reconnect with the last cursor")]
    LogReset,
    /// The server is draining: reconnect (to another replica).
    #[error("the server is shutting down; reconnect with the last cursor")]
    ShuttingDown,
    /// Ended for another reason (a client that stopped reading its
    /// snapshot, a reason the client could not be sent): reconnect.
    #[error("the watch was interrupted; reconnect with the last cursor")]
    Interrupted,
}

/// Why a watch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    /// `--max-revocation-watchers` streams are open.
    #[error("too many WatchRevocations streams are open")]
    TooManyWatchers,
    /// The server is draining.
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl Revocations {
    /// Streams the watermarks of `pools`: those after `cursor` when it
    /// belongs to this log, else every live one; then each new one.
    pub fn watch(
        &self,
        pools: Vec<UserPoolId>,
        cursor: Option<Cursor>,
    ) -> Result<ReceiverStream<Result<Watched, WatchEnd>>, WatchRefused> {
        let shared = &self.shared;
        if shared.closing.is_cancelled() {
            return Err(WatchRefused::ShuttingDown);
        }
        let permit = shared
            .watchers
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchRefused::TooManyWatchers)?;
        let (sender, receiver) = mpsc::channel(CLIENT_BUFFER);
        tokio::spawn(
            Watcher {
                shared: shared.clone(),
                pools,
                sender,
                _permit: permit,
            }
            .run(cursor),
        );
        Ok(ReceiverStream::new(receiver))
    }
}

struct Watcher {
    shared: Arc<Shared>,
    pools: Vec<UserPoolId>,
    sender: mpsc::Sender<Result<Watched, WatchEnd>>,
    _permit: OwnedSemaphorePermit,
}

/// The client left.
struct Gone;

impl Watcher {
    async fn run(self, cursor: Option<Cursor>) {
        let shared = self.shared.clone();
        shared.metrics.watchers.inc();
        tokio::select! {
            // Ends the task at once when the client goes, even if the log
            // is quiet.
            () = self.sender.closed() => {}
            () = shared.closing.cancelled() => {
                let _ = self.sender.try_send(Err(WatchEnd::ShuttingDown));
            }
            _ = self.stream(cursor) => {}
        }
        shared.metrics.watchers.dec();
    }

    async fn stream(&self, cursor: Option<Cursor>) -> Result<(), Gone> {
        // Nothing is logged, and no cursor can be judged, before the log is
        // loaded: wait for it (during a Redis outage, until Redis is back).
        let mut loaded = self.shared.caught_up.subscribe();
        if loaded.wait_for(|loaded| *loaded).await.is_err() {
            return Err(Gone);
        }
        // Subscribe before the snapshot: what comes after the snapshot's
        // end arrives as an event (and what both hold is sent once).
        let mut events = self.shared.watermarks.subscribe();
        let Some(epoch) = self.shared.epoch.load_full() else {
            return Err(Gone);
        };
        let mut after = cursor
            .filter(|cursor| cursor.epoch == *epoch)
            .map(|cursor| cursor.position);
        self.send_logged_since(&mut after, &epoch).await?;
        loop {
            match events.recv().await {
                Ok(LogEvent::Revoked(revocation)) => {
                    if self.pools.contains(&revocation.pool)
                        && after.is_none_or(|after| revocation.position > after)
                    {
                        self.send(Revocation::clone(&revocation), &epoch).await?;
                        after = Some(revocation.position);
                    }
                }
                Ok(LogEvent::Reset) => {
                    let _ = self.sender.send(Err(WatchEnd::LogReset)).await;
                    return Err(Gone);
                }
                // Fell behind the event buffer: the map has what was missed.
                Err(RecvError::Lagged(_)) => self.send_logged_since(&mut after, &epoch).await?,
                Err(RecvError::Closed) => return Err(Gone),
            }
        }
    }

    /// Sends the log's prefix after `after` held in the map, in log order,
    /// and moves `after` to the prefix's end.
    async fn send_logged_since(
        &self,
        after: &mut Option<Position>,
        epoch: &Epoch,
    ) -> Result<(), Gone> {
        // Held while the snapshot is sent, not only while it is built: it
        // bounds the snapshots in memory at once, whatever the clients' pace.
        let _permit = self.shared.snapshots.acquire().await;
        let snapshot = self.shared.watermarks.snapshot(Some(&self.pools), *after);
        let end = snapshot.end;
        for revocation in snapshot {
            tokio::time::timeout(SNAPSHOT_SEND_TIMEOUT, self.send(revocation, epoch))
                .await
                .map_err(|_| Gone)??;
        }
        *after = Some(end);
        Ok(())
    }

    async fn send(&self, revocation: Revocation, epoch: &Epoch) -> Result<(), Gone> {
        let watched = Watched {
            expires_at: self.shared.watermarks.expires_at(revocation.revoked_before),
            cursor: Cursor {
                epoch: epoch.clone(),
                position: revocation.position,
            },
            revocation,
        };
        self.sender.send(Ok(watched)).await.map_err(|_| Gone)
    }
}
