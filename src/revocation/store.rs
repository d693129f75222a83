//! The revocation log in Redis: one key per user holding their watermark
//! (raised, never lowered, expiring after the keep time) and a stream of
//! every raise, which each replica reads to keep its map current. Both
//! change in one script, so the stream never holds a value the key lost.
//!
//! Keys share the budget's hash tag (`{prefix}`), so one slot holds them.

use std::{sync::LazyLock, time::Duration};

use ::redis::{Cmd, Script, Value, streams::StreamReadReply};

use super::{
    cursor::{Epoch, Position},
    watermarks::Revocation,
};
use crate::{
    domain::UserPoolId,
    redis::{FreshConnection, Redis, RedisCallError},
};

static REVOKE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("revoke.lua")));
static EPOCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("epoch.lua")));
static LAST_ID: LazyLock<Script> = LazyLock::new(|| Script::new(LAST_ID_LUA));

/// The log's last generated id ('0-0' when there is no log), in one script
/// so the key cannot vanish between the check and XINFO.
const LAST_ID_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return '0-0'
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then
    return info[i + 1]
  end
end
return '0-0'
";

/// Entries read per call while catching up.
pub(super) const READ_BATCH: usize = 1000;

/// Watermarks per write-back pipeline: short, so that the budget's calls
/// on the same shared connection wait little behind one.
const WRITE_BATCH: usize = 100;

/// The scripts a connection should have loaded.
pub fn scripts() -> Vec<Script> {
    vec![REVOKE.clone(), EPOCH.clone(), LAST_ID.clone()]
}

/// What recording one watermark did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Logged {
    /// Raised and appended to the log.
    Raised(Position),
    /// Redis already held this watermark or a later one.
    Kept,
    /// The log is not the one the caller knows: nothing written.
    OtherEpoch,
}

/// The keys and the keep time; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct RedisLog {
    redis: Redis,
    prefix: String,
    /// Seconds a watermark is kept after it is recorded.
    keep_secs: i64,
}

impl RedisLog {
    pub(super) fn new(redis: Redis, prefix: &str, keep_secs: i64) -> Self {
        Self {
            redis,
            prefix: prefix.to_owned(),
            keep_secs,
        }
    }

    pub(super) fn redis(&self) -> &Redis {
        &self.redis
    }

    fn log_key(&self) -> String {
        format!("{{{}}}:revocations", self.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{{{}}}:revocations:epoch", self.prefix)
    }

    fn watermark_key(&self, pool: &UserPoolId, sub: &str) -> String {
        // A pool id holds no ':', so pool and sub cannot run together.
        format!("{{{}}}:revoked:{}:{sub}", self.prefix, pool.as_str())
    }

    /// `revoke.lua`'s KEYS and ARGV, in its order: one place for the
    /// single call and the pipelined write-back.
    fn revoke_call(
        &self,
        epoch: &Epoch,
        pool: &UserPoolId,
        sub: &str,
        revoked_before: i64,
    ) -> ([String; 3], [String; 5]) {
        (
            [
                self.watermark_key(pool, sub),
                self.log_key(),
                self.epoch_key(),
            ],
            [
                epoch.as_str().to_owned(),
                pool.as_str().to_owned(),
                sub.to_owned(),
                revoked_before.to_string(),
                self.keep_secs.to_string(),
            ],
        )
    }

    /// The log's epoch, made now if Redis has none (a new log, or one lost).
    pub(super) async fn epoch(&self) -> Result<Epoch, RedisCallError> {
        let candidate = Epoch::random();
        let mut invocation = EPOCH.key(self.epoch_key());
        invocation.arg(candidate.as_str());
        let epoch: String = self
            .redis
            .run_script("revocation_epoch", &invocation)
            .await?;
        // Anything else in that key is not ours: treat it as a lost log.
        Ok(Epoch::parse(&epoch).unwrap_or(candidate))
    }

    /// The last id the log generated (`0-0` when there is no log). Lower
    /// than an id read before means Redis lost entries with the epoch kept
    /// (an older snapshot, a failover to a lagging replica).
    pub(super) async fn last_generated(&self) -> Result<Position, RedisCallError> {
        let invocation = LAST_ID.key(self.log_key());
        let id: String = self
            .redis
            .run_script("revocation_last_id", &invocation)
            .await?;
        id.parse().map_err(|_| bad_reply("stream id"))
    }

    /// Raises one watermark in the log known as `epoch`.
    pub(super) async fn record(
        &self,
        epoch: &Epoch,
        pool: &UserPoolId,
        sub: &str,
        revoked_before: i64,
    ) -> Result<Logged, RedisCallError> {
        let (keys, args) = self.revoke_call(epoch, pool, sub, revoked_before);
        let mut invocation = REVOKE.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let (outcome, value): (String, String) = self
            .redis
            .run_script("revocation_record", &invocation)
            .await?;
        Ok(match outcome.as_str() {
            "raised" => Logged::Raised(value.parse().map_err(|_| bad_reply("stream id"))?),
            "kept" => Logged::Kept,
            _ => Logged::OtherEpoch,
        })
    }

    /// Up to [`READ_BATCH`] entries after `after`, waiting up to `block`
    /// for one when there are none (no wait when `None`). Entries that do
    /// not parse are logged and skipped, never fatal.
    pub(super) async fn read_after(
        &self,
        connection: &FreshConnection,
        after: Position,
        block: Option<Duration>,
    ) -> Result<(Vec<Revocation>, Option<Position>), RedisCallError> {
        let mut command = Cmd::new();
        command.arg("XREAD").arg("COUNT").arg(READ_BATCH);
        if let Some(block) = block {
            command
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        command
            .arg("STREAMS")
            .arg(self.log_key())
            .arg(after.to_string());
        let bound = block.unwrap_or_default() + self.redis.timeout().max(Duration::from_secs(1));
        let reply: Option<StreamReadReply> = self
            .redis
            .query_on(connection, "revocation_read", &command, bound)
            .await?;
        let ids = reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids);
        let mut entries = Vec::new();
        let mut last = None;
        for id in ids {
            let Ok(position) = id.id.parse::<Position>() else {
                tracing::warn!(
                    id = id.id,
                    "revocation log: an entry id that is not <ms>-<seq>"
                );
                continue;
            };
            last = Some(position);
            let pool = id
                .get::<String>("pool")
                .and_then(|pool| UserPoolId::parse(pool).ok());
            let sub = id.get::<String>("sub").filter(|sub| !sub.is_empty());
            let revoked_before = id.get::<i64>("before");
            match (pool, sub, revoked_before) {
                (Some(pool), Some(sub), Some(revoked_before)) => entries.push(Revocation {
                    pool,
                    sub,
                    revoked_before,
                    position,
                }),
                _ => tracing::warn!(
                    id = id.id,
                    "revocation log: an entry without pool, sub or before"
                ),
            }
        }
        Ok((entries, last))
    }

    /// Writes many watermarks back (a log that was lost, writes that had
    /// failed), pipelined. Returns how many the log did not have.
    pub(super) async fn record_many(
        &self,
        epoch: &Epoch,
        entries: &[(UserPoolId, String, i64)],
    ) -> Result<usize, RedisCallError> {
        // EVALSHA in a pipeline is not re-sent after NOSCRIPT: load first.
        let mut load = Cmd::new();
        load.arg("SCRIPT")
            .arg("LOAD")
            .arg(include_str!("revoke.lua"));
        let _: String = self.redis.query("revocation_load", &load).await?;
        let mut added = 0;
        // Each pipeline bounded on its own: a slow one fails the write-back
        // (retried later), never holds it for long.
        let per_chunk = self.redis.timeout().max(Duration::from_secs(2));
        for chunk in entries.chunks(WRITE_BATCH) {
            let mut pipe = ::redis::pipe();
            for (pool, sub, revoked_before) in chunk {
                let (keys, args) = self.revoke_call(epoch, pool, sub, *revoked_before);
                pipe.cmd("EVALSHA")
                    .arg(REVOKE.get_hash())
                    .arg(keys.len())
                    .arg(&keys)
                    .arg(&args);
            }
            let replies: Vec<(String, Value)> = self
                .redis
                .pipeline("revocation_rewrite", &pipe, per_chunk)
                .await?;
            for (outcome, _) in replies {
                match outcome.as_str() {
                    "raised" => added += 1,
                    "kept" => {}
                    _ => return Err(bad_reply("the log changed epoch while it was rewritten")),
                }
            }
        }
        Ok(added)
    }
}

fn bad_reply(what: &'static str) -> RedisCallError {
    RedisCallError::Script(::redis::RedisError::from((
        ::redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply from the revocation script",
        what.to_owned(),
    )))
}
