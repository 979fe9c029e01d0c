//! The report: every figure with the baseline it is compared to, measured in
//! the same run, the ratio between them, and the design budget where
//! DESIGN.md sets one.

use serde::Serialize;

/// A limit from DESIGN.md's performance budget.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Budget {
    /// The figure divided by its baseline must be at least this.
    MinRatio(f64),
    /// The figure itself (in its unit) must be at most this.
    Max(f64),
    /// The figure itself (in its unit) must be at least this.
    Min(f64),
    /// The figure divided by its baseline must be at most this.
    MaxRatio(f64),
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Dotted name, e.g. `api.signing_throughput`.
    pub(crate) name: String,
    /// The measured value, in `unit`.
    pub(crate) value: f64,
    /// `/s`, `ms`, `MiB`, `B`, ...
    pub(crate) unit: String,
    /// The name of the baseline figure it is compared with.
    pub(crate) baseline: Option<String>,
    /// That baseline's value (same run).
    pub(crate) baseline_value: Option<f64>,
    /// `value / baseline_value`.
    pub(crate) ratio: Option<f64>,
    /// The budget, in words.
    pub(crate) budget: Option<String>,
    /// Whether the budget is met, when there is one.
    pub(crate) budget_met: Option<bool>,
    /// How the figure was obtained, briefly.
    pub(crate) note: String,
}

/// Facts about the machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) memory_gib: f64,
    /// /proc/loadavg when the run started: other work competing for the CPUs.
    pub(crate) loadavg_at_start: String,
}

impl Machine {
    pub(crate) fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel,
            memory_gib,
            loadavg_at_start: loadavg(),
        }
    }
}

/// The first three fields of /proc/loadavg.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every figure of a run, in the order measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) mode: String,
    pub(crate) figures: Vec<Figure>,
    /// /proc/loadavg when the report was printed.
    pub(crate) loadavg_at_end: String,
}

impl Report {
    pub(crate) fn new(mode: &str) -> Self {
        Self {
            machine: Machine::detect(),
            mode: mode.into(),
            figures: Vec::new(),
            loadavg_at_end: String::new(),
        }
    }

    /// The value of a figure recorded earlier.
    pub(crate) fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// Records a baseline (a figure without a ratio).
    pub(crate) fn baseline(&mut self, name: &str, value: f64, unit: &str, note: &str) {
        self.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: None,
            baseline_value: None,
            ratio: None,
            budget: None,
            budget_met: None,
            note: note.into(),
        });
    }

    /// Records a figure beside the baseline `against` (recorded earlier),
    /// checking `budget` if given.
    pub(crate) fn figure(
        &mut self,
        name: &str,
        value: f64,
        unit: &str,
        against: &str,
        budget: Option<Budget>,
        note: &str,
    ) {
        let baseline_value = self.get(against);
        let ratio = baseline_value.filter(|b| *b != 0.0).map(|b| value / b);
        let (budget_text, met) = match budget {
            None => (None, None),
            Some(Budget::MinRatio(min)) => (
                Some(format!(">= {min:.2}x {against}")),
                ratio.map(|r| r >= min),
            ),
            Some(Budget::Max(max)) => (Some(format!("<= {} {unit}", fmt(max))), Some(value <= max)),
            Some(Budget::Min(min)) => (Some(format!(">= {} {unit}", fmt(min))), Some(value >= min)),
            Some(Budget::MaxRatio(max)) => (
                Some(format!("<= {max:.2}x {against}")),
                ratio.map(|r| r <= max),
            ),
        };
        self.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: Some(against.into()),
            baseline_value,
            ratio,
            budget: budget_text,
            budget_met: met,
            note: note.into(),
        });
    }

    /// Records a figure that is itself a ratio of two same-run figures
    /// (unit `x`), which must be at most `max`.
    pub(crate) fn ratio(&mut self, name: &str, value: f64, max: f64, note: &str) {
        self.push(Figure {
            name: name.into(),
            value,
            unit: "x".into(),
            baseline: None,
            baseline_value: None,
            ratio: Some(value),
            budget: Some(format!("<= {max:.2}x")),
            budget_met: Some(value <= max),
            note: note.into(),
        });
    }

    fn push(&mut self, f: Figure) {
        eprintln!("{}", line(&f));
        self.figures.push(f);
    }

    /// The plain-text report, one figure per line.
    pub(crate) fn text(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "machine: {} CPUs, {}, Linux {}, {:.1} GiB; load average {} at start, {} at end; mode: {}\n",
            m.cpus,
            m.cpu_model,
            m.kernel,
            m.memory_gib,
            m.loadavg_at_start,
            self.loadavg_at_end,
            self.mode
        );
        for f in &self.figures {
            out.push_str(&line(f));
            out.push('\n');
        }
        out
    }
}

/// A number with a precision that suits its size.
pub(crate) fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn line(f: &Figure) -> String {
    let mut s = format!("{}: {} {}", f.name, fmt(f.value), f.unit);
    match (&f.baseline, f.ratio, f.baseline_value) {
        (Some(b), Some(r), Some(bv)) => {
            s.push_str(&format!(" ({}x {b} = {})", fmt(r), fmt(bv)));
        }
        (Some(b), _, _) => s.push_str(&format!(" (baseline {b} missing)")),
        (None, Some(_), _) => s.push_str(" [ratio]"),
        _ => s.push_str(" [baseline]"),
    }
    if let (Some(b), Some(met)) = (&f.budget, f.budget_met) {
        s.push_str(&format!(
            " budget {b}: {}",
            if met { "met" } else { "MISSED" }
        ));
    }
    if !f.note.is_empty() {
        s.push_str(&format!(" -- {}", f.note));
    }
    s
}
