//! Per-caller limits, checked before the shared budget so that one noisy
//! caller cannot spend everybody's share. A bounded table of GCRA cells (see
//! `gcra.rs` for why not governor's keyed limiter).
//!
//! Who gets a cell of their own: verified identities (a client certificate,
//! a trusted XFCC), and callers named in the overrides. A self-declared id
//! is a label anyone can mint, so every other self-declared (or anonymous)
//! caller shares one cell at the default rate: a new id per request buys
//! one caller's allowance in all, never the shared budget.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::gcra::Gcra;
use crate::identity::CallerId;

/// This caller is over its own rate; come back after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("caller rate limit exceeded; retry after {retry_after:?}")]
pub struct CallerRateLimited {
    /// When the caller's next request would conform.
    pub retry_after: Duration,
}

/// Sizing of the per-caller limits.
#[derive(Debug, Clone, Default)]
pub struct CallerSettings {
    /// Requests per second per caller; `None` is unlimited.
    pub rate_per_sec: Option<f64>,
    /// Requests a caller may send at once after a quiet period (default:
    /// one second's worth).
    pub burst: Option<u32>,
    /// Rates for named callers, replacing `rate_per_sec` for them.
    pub overrides: Vec<(CallerId, f64)>,
    /// Callers remembered at most; new ones beyond it share one cell.
    pub max_tracked: usize,
}

/// A caller's allowance as a rate and a burst, kept wherever the budget
/// keeps its cells (Redis, for the fleet).
#[derive(Debug, Clone, PartialEq)]
pub struct CallerCell {
    /// Whose allowance it is.
    pub name: CallerCellName,
    /// Requests per second.
    pub rate_per_sec: f64,
    /// Requests at once after a quiet period.
    pub burst: u32,
}

/// Who a cell belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerCellName {
    /// A verified identity, or a caller named in the overrides.
    Own(CallerId),
    /// Every unverified caller no override names.
    Unverified,
}

/// Per-caller GCRA cells, at most `max_tracked` of them.
#[derive(Debug)]
pub struct CallerLimits {
    settings: CallerSettings,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Callers at the default rate, at most `max_tracked`.
    cells: HashMap<CallerId, Gcra>,
    /// Callers named in the overrides: configured, so few, and always
    /// tracked, never pushed into the overflow cell.
    overridden: HashMap<CallerId, Gcra>,
    /// Shared, at the default rate, by every unverified caller that no
    /// override names.
    unverified: Option<Gcra>,
    /// Shared, at the default rate, by new callers while the table is full
    /// of active ones, so random ids cannot grow memory (and gain nothing:
    /// they share one allowance).
    overflow: Option<Gcra>,
    /// No tracked cell goes idle before this: while the table is full, new
    /// ids skip the sweep until then instead of each scanning every cell.
    next_sweep: Option<Instant>,
    /// Sweeps so far (tests count them).
    sweeps: usize,
}

impl CallerLimits {
    /// An empty table.
    pub fn new(settings: CallerSettings) -> Self {
        Self {
            settings,
            table: Mutex::default(),
        }
    }

    /// Takes one request from `caller`'s allowance; `verified` when the id
    /// comes from a verified identity rather than the caller's own say-so.
    pub fn check(
        &self,
        caller: &CallerId,
        verified: bool,
        now: Instant,
    ) -> Result<(), CallerRateLimited> {
        let take = |cell: &mut Gcra| {
            cell.try_take(now)
                .map_err(|retry_after| CallerRateLimited { retry_after })
        };
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let table = &mut *table;
        if let Some(rate) = self.override_for(caller) {
            let cell = table
                .overridden
                .entry(caller.clone())
                .or_insert_with(|| Gcra::new(rate, self.burst_for(rate), now));
            return take(cell);
        }
        let Some(rate) = self.settings.rate_per_sec else {
            return Ok(());
        };
        let new_cell = || Gcra::new(rate, self.burst_for(rate), now);
        if !verified {
            return take(table.unverified.get_or_insert_with(new_cell));
        }
        let full = |table: &Table| table.cells.len() >= self.settings.max_tracked;
        if !table.cells.contains_key(caller) && full(table) {
            table.sweep(now);
        }
        if !table.cells.contains_key(caller) && full(table) {
            return take(table.overflow.get_or_insert_with(new_cell));
        }
        let cell = table.cells.entry(caller.clone()).or_insert_with(new_cell);
        let result = take(cell);
        // Use only moves a cell's idle time later, so the earliest one can
        // only move earlier when a cell is added: keep the bound true.
        let idle_at = cell.idle_at();
        table.next_sweep = table.next_sweep.map(|at| at.min(idle_at));
        result
    }

    /// The fleet-wide cell `caller` draws on (see the module doc for who
    /// shares one); `None` when the caller is unlimited.
    pub fn shared_cell(&self, caller: &CallerId, verified: bool) -> Option<CallerCell> {
        let cell = |name: CallerCellName, rate: f64| CallerCell {
            name,
            rate_per_sec: rate,
            burst: self.burst_for(rate),
        };
        if let Some(rate) = self.override_for(caller) {
            return Some(cell(CallerCellName::Own(caller.clone()), rate));
        }
        let rate = self.settings.rate_per_sec?;
        // Redis keys expire when idle, so there is no table to bound and no
        // overflow cell: a verified identity always has its own.
        Some(if verified {
            cell(CallerCellName::Own(caller.clone()), rate)
        } else {
            cell(CallerCellName::Unverified, rate)
        })
    }

    /// Callers currently tracked at the default rate.
    pub fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cells
            .len()
    }

    fn override_for(&self, caller: &CallerId) -> Option<f64> {
        self.settings
            .overrides
            .iter()
            .find(|(id, _)| id == caller)
            .map(|(_, rate)| *rate)
    }

    fn burst_for(&self, rate: f64) -> u32 {
        // One second's worth by default, and at least one request.
        self.settings.burst.unwrap_or(rate.ceil() as u32).max(1)
    }
}

impl Table {
    /// Forgets idle callers, unless none can be idle yet.
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.sweeps += 1;
        let mut earliest_idle: Option<Instant> = None;
        self.cells.retain(|_, cell| {
            let idle_at = cell.idle_at();
            let keep = idle_at > now;
            if keep {
                earliest_idle = Some(earliest_idle.map_or(idle_at, |e| e.min(idle_at)));
            }
            keep
        });
        self.next_sweep = earliest_idle;
    }
}

#[cfg(test)]
mod tests {
    //! Time is passed in explicitly: a fake clock, nothing sleeps.

    use super::*;

    fn caller(id: &str) -> CallerId {
        CallerId::parse(id).expect("valid caller id")
    }

    fn limited(rate: f64, burst: u32, max_tracked: usize) -> CallerLimits {
        CallerLimits::new(CallerSettings {
            rate_per_sec: Some(rate),
            burst: Some(burst),
            overrides: vec![],
            max_tracked,
        })
    }

    #[test]
    fn without_a_per_caller_rate_everyone_is_admitted() {
        let limits = CallerLimits::new(CallerSettings::default());
        let now = Instant::now();
        for _ in 0..1000 {
            limits
                .check(&caller("noisy"), true, now)
                .expect("unlimited");
        }
        assert_eq!(limits.tracked(), 0, "nothing tracked when unlimited");
    }

    #[test]
    fn a_caller_over_its_rate_is_refused_with_the_wait_and_others_are_not() {
        let limits = limited(2.0, 1, 100);
        let now = Instant::now();

        limits.check(&caller("noisy"), true, now).expect("first");
        let refused = limits
            .check(&caller("noisy"), true, now)
            .expect_err("second at once");
        limits
            .check(&caller("quiet"), true, now)
            .expect("quiet caller unaffected");

        assert_eq!(refused.retry_after, Duration::from_millis(500));
        limits
            .check(&caller("noisy"), true, now + Duration::from_millis(500))
            .expect("after the wait");
    }

    #[test]
    fn an_override_replaces_the_default_rate_for_that_caller() {
        let limits = CallerLimits::new(CallerSettings {
            rate_per_sec: Some(1.0),
            burst: None,
            overrides: vec![(caller("batch"), 5.0)],
            max_tracked: 100,
        });
        let now = Instant::now();

        for _ in 0..5 {
            limits
                .check(&caller("batch"), true, now)
                .expect("override allows a burst of 5");
        }
        assert!(limits.check(&caller("batch"), true, now).is_err());
        limits
            .check(&caller("other"), true, now)
            .expect("default allows 1");
        assert!(limits.check(&caller("other"), true, now).is_err());
    }

    #[test]
    fn random_caller_ids_beyond_the_bound_share_one_cell_and_known_ones_keep_theirs() {
        let limits = limited(1.0, 1, 10);
        let now = Instant::now();
        for i in 0..10 {
            limits
                .check(&caller(&format!("known-{i}")), true, now)
                .expect("tracked");
        }

        let refused = (0..100)
            .filter(|i| {
                limits
                    .check(&caller(&format!("random-{i}")), true, now)
                    .is_err()
            })
            .count();

        assert_eq!(limits.tracked(), 10);
        assert_eq!(refused, 99, "all random ids share one cell of burst 1");
        let later = now + Duration::from_secs(1);
        limits
            .check(&caller("known-3"), true, later)
            .expect("a known caller keeps its own cell");
    }

    #[test]
    fn a_full_table_of_active_callers_is_swept_once_not_for_every_new_id() {
        let limits = limited(1.0, 1, 100);
        let now = Instant::now();
        for i in 0..100 {
            limits
                .check(&caller(&format!("known-{i}")), true, now)
                .expect("tracked");
        }

        for i in 0..1000 {
            let _ = limits.check(&caller(&format!("random-{i}")), true, now);
        }

        let table = limits.table.lock().expect("not poisoned");
        assert_eq!(table.sweeps, 1, "nothing could be idle before 1 s");
        drop(table);
        let later = now + Duration::from_secs(1);
        limits
            .check(&caller("newcomer"), true, later)
            .expect("idle callers swept once they can be");
        assert_eq!(limits.table.lock().expect("not poisoned").sweeps, 2);
    }

    #[test]
    fn the_overflow_cell_has_the_default_rate_whoever_arrives_first() {
        let limits = CallerLimits::new(CallerSettings {
            rate_per_sec: Some(1.0),
            burst: None,
            overrides: vec![(caller("batch"), 100.0)],
            max_tracked: 1,
        });
        let now = Instant::now();
        limits.check(&caller("known"), true, now).expect("tracked");

        // An overridden caller arriving at a full table keeps its own rate
        // and does not lend it to the overflow cell.
        for _ in 0..100 {
            limits
                .check(&caller("batch"), true, now)
                .expect("its own burst");
        }
        let refused = (0..10)
            .filter(|i| {
                limits
                    .check(&caller(&format!("random-{i}")), true, now)
                    .is_err()
            })
            .count();

        assert_eq!(refused, 9, "random ids share one cell at the default rate");
    }

    #[test]
    fn unverified_callers_share_one_cell_unless_an_override_names_them() {
        let limits = CallerLimits::new(CallerSettings {
            rate_per_sec: Some(1.0),
            burst: Some(2),
            overrides: vec![(caller("billing"), 1.0)],
            max_tracked: 100,
        });
        let now = Instant::now();
        let admitted = (0..100)
            .filter(|i| {
                limits
                    .check(&caller(&format!("minted-{i}")), false, now)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 2, "minted ids share one burst");
        assert!(limits.check(&CallerId::anonymous(), false, now).is_err());
        limits
            .check(&caller("billing"), false, now)
            .expect("a named caller keeps its own cell");
        limits
            .check(&caller("spiffe://x/verified"), true, now)
            .expect("a verified caller keeps its own cell");
        assert_eq!(limits.tracked(), 1);
    }

    #[test]
    fn idle_callers_are_forgotten_when_room_is_needed() {
        let limits = limited(1.0, 1, 2);
        let now = Instant::now();
        limits.check(&caller("a"), true, now).expect("a");
        limits.check(&caller("b"), true, now).expect("b");

        let later = now + Duration::from_secs(5);
        limits
            .check(&caller("c"), true, later)
            .expect("c gets its own cell");

        assert_eq!(limits.tracked(), 1, "a and b were idle and dropped");
        limits.check(&caller("d"), true, later).expect("room for d");
        assert_eq!(limits.tracked(), 2);
    }

    #[test]
    fn fleet_cells_follow_the_same_rules_as_local_ones() {
        let limits = CallerLimits::new(CallerSettings {
            rate_per_sec: Some(2.0),
            burst: None,
            overrides: vec![(caller("billing"), 5.0)],
            max_tracked: 1,
        });
        let shared = |id: &str, verified| limits.shared_cell(&caller(id), verified);
        let own = |id: &str, rate: f64, burst: u32| {
            Some(CallerCell {
                name: CallerCellName::Own(caller(id)),
                rate_per_sec: rate,
                burst,
            })
        };
        assert_eq!(shared("billing", false), own("billing", 5.0, 5));
        assert_eq!(shared("spiffe://x/a", true), own("spiffe://x/a", 2.0, 2));
        assert_eq!(
            shared("minted-1", false),
            shared("minted-2", false),
            "unverified ids share one cell"
        );
        assert_eq!(
            shared("minted-1", false).map(|c| c.name),
            Some(CallerCellName::Unverified)
        );
        let unlimited = CallerLimits::new(CallerSettings::default());
        assert_eq!(unlimited.shared_cell(&caller("a"), true), None);
    }
}
