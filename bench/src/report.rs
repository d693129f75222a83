//! The table a run prints (and writes to BENCHMARKS.md with `--markdown`).

/// One line of the table.
pub(crate) struct Row {
    what: String,
    measured: String,
    floor: String,
    ratio: String,
    goal: String,
    met: Option<bool>,
}

impl Row {
    /// Measured against a floor.
    pub(crate) fn ratio(
        what: &str,
        measured: String,
        floor: String,
        ratio: f64,
        goal: &str,
        met: bool,
    ) -> Self {
        Self {
            what: what.into(),
            measured,
            floor,
            ratio: format!("{ratio:.3}"),
            goal: goal.into(),
            met: Some(met),
        }
    }

    /// An absolute figure with a goal.
    pub(crate) fn value(what: &str, measured: String, goal: &str, met: bool) -> Self {
        Self {
            what: what.into(),
            measured,
            floor: "—".into(),
            ratio: "—".into(),
            goal: goal.into(),
            met: Some(met),
        }
    }

    /// Context for the rows above it; no goal.
    pub(crate) fn note(what: &str, measured: String) -> Self {
        Self {
            what: what.into(),
            measured,
            floor: String::new(),
            ratio: String::new(),
            goal: String::new(),
            met: None,
        }
    }

    /// True when the row has a goal and missed it.
    pub(crate) fn missed(&self) -> bool {
        self.met == Some(false)
    }
}

/// A Markdown table of `rows`.
pub(crate) fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | measured | floor | ratio | goal | met |\n|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {met} |\n",
            row.what, row.measured, row.floor, row.ratio, row.goal
        ));
    }
    out
}

/// What the run ran on, for the record.
pub(crate) fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let kernel = read("/proc/sys/kernel/osrelease");
    format!(
        "{cores} cores ({cpu}), {memory} RAM, Linux {}",
        kernel.trim()
    )
}
