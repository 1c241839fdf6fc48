//! Aggregation across runs, the targets, and the output: JSON lines and a
//! markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::stats::{mean, median, percentile};
use super::{Measured, WORKLOADS};

/// One workload over all its runs.
#[derive(Debug)]
pub struct Aggregate {
    pub id: String,
    pub runs: usize,
    /// Medians of per-run figures, and percentiles of the pooled samples
    /// (`<sample>_p50_ms`, `_p95_ms`, `_p99_ms`, `_max_ms`, `_mean_ms`, `_n`).
    pub figures: BTreeMap<String, f64>,
    pub per_run: BTreeMap<String, Vec<f64>>,
    pub checks: BTreeMap<String, (bool, Vec<Value>)>,
    pub memory_kib: BTreeMap<String, u64>,
    pub info: Vec<Value>,
    pub errors: Vec<String>,
}

impl Aggregate {
    pub fn new(id: &str, runs: Vec<Measured>, errors: Vec<String>) -> Aggregate {
        let mut per_run: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut pooled: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut checks: BTreeMap<String, (bool, Vec<Value>)> = BTreeMap::new();
        let mut memory_kib: BTreeMap<String, u64> = BTreeMap::new();
        let mut info = Vec::new();
        for run in &runs {
            for (k, v) in &run.figures {
                per_run.entry(k.clone()).or_default().push(*v);
            }
            for (k, v) in &run.samples {
                pooled.entry(k.clone()).or_default().extend(v);
            }
            for (k, (pass, detail)) in &run.checks {
                let entry = checks.entry(k.clone()).or_insert((true, Vec::new()));
                entry.0 &= *pass;
                entry.1.push(detail.clone());
            }
            for (role, kib) in &run.memory_kib {
                let entry = memory_kib.entry(role.clone()).or_default();
                *entry = (*entry).max(*kib);
            }
            info.push(Value::Object(run.info.clone()));
        }
        let mut figures: BTreeMap<String, f64> = per_run
            .iter()
            .filter_map(|(k, v)| median(v).map(|m| (k.clone(), m)))
            .collect();
        for (k, v) in &pooled {
            for (suffix, p) in [("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)] {
                if let Some(x) = percentile(v, p) {
                    figures.insert(format!("{k}_{suffix}_ms"), x);
                }
            }
            if let Some(m) = mean(v) {
                figures.insert(format!("{k}_mean_ms"), m);
            }
            figures.insert(format!("{k}_n"), v.len() as f64);
        }
        Aggregate {
            id: id.to_owned(),
            runs: runs.len(),
            figures,
            per_run,
            checks,
            memory_kib,
            info,
            errors,
        }
    }

    pub fn checks_pass(&self) -> bool {
        self.checks.values().all(|(pass, _)| *pass)
    }

    fn title(&self) -> &'static str {
        WORKLOADS
            .iter()
            .find(|(id, _)| *id == self.id)
            .map_or("", |(_, t)| t)
    }

    /// Every Weft figure as a ratio to L (durations) or U (rates).
    fn ratios(&self, cal: &Calibration) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if self.id == "W0" || self.id == "W7" {
            return out;
        }
        for (k, v) in &self.figures {
            if let (true, Some(l)) = (k.ends_with("_ms"), cal.l_ms) {
                out.insert(format!("{k}_over_L"), round(v / l, 3));
            } else if let (true, Some(u)) = (k.ends_with("_per_s"), cal.u_steps_per_s) {
                out.insert(format!("{k}_over_U"), round(v / u, 3));
            }
        }
        out
    }

    pub fn to_json(&self, cal: &Calibration, targets: &[Target]) -> Value {
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|(k, v)| (k.clone(), json!(round(*v, 3))))
            .collect();
        let per_run: serde_json::Map<String, Value> = self
            .per_run
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(v.iter().map(|x| round(*x, 3)).collect::<Vec<_>>()),
                )
            })
            .collect();
        let checks: serde_json::Map<String, Value> = self
            .checks
            .iter()
            .map(|(k, (pass, detail))| (k.clone(), json!({ "pass": pass, "runs": detail })))
            .collect();
        let targets: Vec<Value> = targets
            .iter()
            .filter(|t| t.workload == self.id)
            .map(Target::to_json)
            .collect();
        json!({
            "workload": self.id,
            "title": self.title(),
            "runs": self.runs,
            "errors": self.errors,
            "figures": figures,
            "per_run": per_run,
            "ratios": self.ratios(cal),
            "checks": checks,
            "memory_kib": self.memory_kib,
            "targets": targets,
            "info": self.info,
        })
    }
}

/// L and U, from W0.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calibration {
    pub l_ms: Option<f64>,
    pub u_steps_per_s: Option<f64>,
}

impl Calibration {
    pub fn from(aggregates: &[Aggregate]) -> Calibration {
        let w0 = aggregates.iter().find(|a| a.id == "W0");
        Calibration {
            l_ms: w0.and_then(|a| a.figures.get("step_p50_ms").copied()),
            u_steps_per_s: w0.and_then(|a| a.figures.get("parallel_steps_per_s").copied()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    AtMost,
    AtLeast,
    Below,
    Equal,
}

impl Cmp {
    fn holds(self, x: f64, limit: f64) -> bool {
        match self {
            Cmp::AtMost => x <= limit,
            Cmp::AtLeast => x >= limit,
            Cmp::Below => x < limit,
            Cmp::Equal => (x - limit).abs() < 1e-9,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::AtMost => "≤",
            Cmp::AtLeast => "≥",
            Cmp::Below => "<",
            Cmp::Equal => "=",
        }
    }
}

/// A target and how the measurement compares.
#[derive(Debug, Clone)]
pub struct Target {
    pub workload: String,
    pub what: String,
    pub measured: Option<f64>,
    pub unit: &'static str,
    pub cmp: Cmp,
    pub limit: Option<f64>,
    pub limit_text: String,
    /// None: not measured (workload not run or failed, or no calibration).
    pub pass: Option<bool>,
}

impl Target {
    fn new(
        workload: &str,
        what: &str,
        measured: Option<f64>,
        unit: &'static str,
        cmp: Cmp,
        limit: Option<f64>,
        limit_text: String,
    ) -> Target {
        let pass = match (measured, limit) {
            (Some(m), Some(l)) => Some(cmp.holds(m, l)),
            _ => None,
        };
        Target {
            workload: workload.to_owned(),
            what: what.to_owned(),
            measured,
            unit,
            cmp,
            limit,
            limit_text,
            pass,
        }
    }

    fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.what,
            "measured": self.measured.map(|m| round(m, 3)),
            "unit": self.unit,
            "limit": self.limit.map(|l| round(l, 3)),
            "limit_expr": format!("{} {}", self.cmp.symbol(), self.limit_text),
            "verdict": self.verdict(),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Per run, the steps/s of the fastest W5 level that kept up with its hop
/// p99 under `hop_p99_limit_ms` (0 when none did); the median across runs.
fn w5_within_latency(info: &[Value], hop_p99_limit_ms: f64) -> Option<f64> {
    let per_run: Vec<f64> = info
        .iter()
        .filter_map(|run| run.get("levels")?.as_array())
        .map(|levels| {
            levels
                .iter()
                .filter(|lv| lv["keeps_up"].as_bool() == Some(true))
                .filter(|lv| {
                    lv["hop_p99_ms"]
                        .as_f64()
                        .is_some_and(|p| p < hop_p99_limit_ms)
                })
                .filter_map(|lv| lv["steps_per_s"].as_f64())
                .fold(0.0, f64::max)
        })
        .collect();
    super::stats::median(&per_run)
}

/// Every target of the issue, evaluated.
pub fn targets(aggregates: &[Aggregate], cal: &Calibration) -> Vec<Target> {
    let find = |id: &str| aggregates.iter().find(|a| a.id == id && a.runs > 0);
    let fig = |id: &str, key: &str| find(id).and_then(|a| a.figures.get(key).copied());
    let worst = |id: &str, key: &str| {
        find(id).and_then(|a| {
            a.per_run
                .get(key)
                .and_then(|v| v.iter().copied().reduce(f64::max))
        })
    };
    let check = |id: &str, name: &str| {
        find(id).and_then(|a| {
            a.checks
                .get(name)
                .map(|(pass, _)| f64::from(u8::from(*pass)))
        })
    };
    let l = |k: f64| cal.l_ms.map(|l| k * l);
    let u = |k: f64| cal.u_steps_per_s.map(|u| k * u);
    let mut out = Vec::new();
    for w in ["1w", "2w"] {
        out.push(Target::new(
            "W1",
            &format!(
                "streaming tasks/s ({} worker process{})",
                &w[..1],
                if w == "1w" { "" } else { "es" }
            ),
            fig("W1", &format!("stream_{w}_tasks_per_s")),
            "tasks/s",
            Cmp::AtLeast,
            u(1.0),
            "1.0 U".into(),
        ));
    }
    for w in ["1w", "2w"] {
        out.push(Target::new(
            "W1",
            &format!(
                "drain tasks/s ({} worker process{})",
                &w[..1],
                if w == "1w" { "" } else { "es" }
            ),
            fig("W1", &format!("drain_{w}_tasks_per_s")),
            "tasks/s",
            Cmp::AtLeast,
            u(2.0),
            "2.0 U".into(),
        ));
    }
    out.push(Target::new(
        "W2",
        "hop p50",
        fig("W2", "hop_p50_ms"),
        "ms",
        Cmp::AtMost,
        l(1.5),
        "1.5 L".into(),
    ));
    out.push(Target::new(
        "W2",
        "hop p99",
        fig("W2", "hop_p99_ms"),
        "ms",
        Cmp::AtMost,
        l(5.0),
        "5 L".into(),
    ));
    out.push(Target::new(
        "W3",
        "end-to-end p50",
        fig("W3", "e2e_p50_ms"),
        "ms",
        Cmp::AtMost,
        l(4.0),
        "4 L".into(),
    ));
    out.push(Target::new(
        "W4",
        "wide-phase steps/s",
        fig("W4", "wide_steps_per_s"),
        "steps/s",
        Cmp::AtLeast,
        u(2.0),
        "2.0 U".into(),
    ));
    out.push(Target::new(
        "W4",
        "join enqueued (transitions, worst run)",
        worst("W4", "join_enqueued"),
        "",
        Cmp::Equal,
        Some(1.0),
        "1".into(),
    ));
    out.push(Target::new(
        "W5",
        "sustained steps/s at the highest rate that keeps up",
        fig("W5", "best_steps_per_s"),
        "steps/s",
        Cmp::AtLeast,
        u(0.6),
        "0.6 U".into(),
    ));
    // The brief's target in one figure: the highest level that keeps up
    // with hop p99 under 20 L must sustain at least 0.6 U. The hop p99 at
    // the saturation level (the level above) is in the figures table.
    out.push(Target::new(
        "W5",
        "sustained steps/s at the highest rate that keeps up with hop p99 < 20 L",
        find("W5").and_then(|a| cal.l_ms.and_then(|l| w5_within_latency(&a.info, 20.0 * l))),
        "steps/s",
        Cmp::AtLeast,
        u(0.6),
        "0.6 U".into(),
    ));
    out.push(Target::new(
        "W5",
        "invariant violations (worst run)",
        worst("W5", "invariant_violations"),
        "",
        Cmp::Equal,
        Some(0.0),
        "0".into(),
    ));
    out.push(Target::new(
        "W6",
        "every task complete with exactly 3 attempts (1 = yes)",
        check("W6", "exactly_3_attempts_each")
            .zip(check("W6", "all_complete"))
            .map(|(a, b)| a.min(b)),
        "",
        Cmp::Equal,
        Some(1.0),
        "1".into(),
    ));
    out.push(Target::new(
        "W6",
        "retry lateness p99",
        fig("W6", "lateness_p99_ms"),
        "ms",
        Cmp::Below,
        Some(50.0),
        "50 ms".into(),
    ));
    for role in ["orchestrator", "worker1", "worker2"] {
        out.push(Target::new(
            "W7",
            &format!("{role} idle transactions/s"),
            fig("W7", &format!("{role}_tx_per_s")),
            "tx/s",
            Cmp::Below,
            Some(2.0),
            "2".into(),
        ));
        out.push(Target::new(
            "W7",
            &format!("{role} idle CPU"),
            fig("W7", &format!("{role}_cpu_pct")),
            "%",
            Cmp::Below,
            Some(1.0),
            "1 %".into(),
        ));
    }
    let worker_peak = aggregates
        .iter()
        .filter(|a| a.id != "W0")
        .filter_map(|a| a.memory_kib.get("worker"))
        .max()
        .map(|k| *k as f64 / 1024.0);
    out.push(Target::new(
        "memory",
        "worker peak RSS, any workload",
        worker_peak,
        "MiB",
        Cmp::Below,
        Some(64.0),
        "64 MiB".into(),
    ));
    out.push(Target::new(
        "memory",
        "orchestrator peak RSS during W5",
        find("W5")
            .and_then(|a| a.memory_kib.get("orchestrator"))
            .map(|k| *k as f64 / 1024.0),
        "MiB",
        Cmp::Below,
        Some(128.0),
        "128 MiB".into(),
    ));
    out
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The figures worth a row in the table besides the targets.
const HEADLINES: &[(&str, &str, &str)] = &[
    ("W0", "step_p50_ms", "L: 1 client, ms per step (p50)"),
    ("W0", "step_p99_ms", "1 client, ms per step (p99)"),
    ("W0", "parallel_steps_per_s", "U: 4 clients, steps/s"),
    (
        "W0",
        "commit_p50_ms",
        "one durable commit (1-row insert), p50 ms",
    ),
    ("W0", "select_p50_ms", "one `select 1`, p50 ms"),
    (
        "W0",
        "step_reads_no_flush_wait_p50_ms",
        "what-if: L with each pgmq.read not waiting for its WAL flush, ms",
    ),
    (
        "W1",
        "stream_1w_submit_p50_ms",
        "streaming: one POST /v1/tasks, p50 ms",
    ),
    (
        "W1",
        "stream_1w_submit_per_s",
        "streaming: producer's own rate, tasks/s (1 worker)",
    ),
    (
        "W1",
        "drain_1w_processing_tasks_per_s",
        "drain: tasks/s from worker start (1 worker)",
    ),
    (
        "W1",
        "drain_2w_processing_tasks_per_s",
        "drain: tasks/s from worker start (2 workers)",
    ),
    ("W2", "hop_p95_ms", "hop p95, ms"),
    (
        "W2",
        "hop_orchestrator_p50_ms",
        "hop part: result commit → next step enqueued, p50 ms",
    ),
    (
        "W2",
        "hop_worker_p50_ms",
        "hop part: enqueued → handler start, p50 ms",
    ),
    (
        "W2",
        "hop_cc_p50_ms",
        "complete → complete of consecutive steps, p50 ms",
    ),
    ("W2", "e2e_p50_ms", "task end to end p50, ms"),
    ("W2", "e2e_p99_ms", "task end to end p99, ms"),
    ("W3", "e2e_p99_ms", "task end to end p99, ms"),
    ("W3", "hop_p50_ms", "hop p50, ms"),
    ("W4", "makespan_ms", "makespan, ms"),
    (
        "W4",
        "fan_out_ms",
        "root complete → last wide step enqueued, ms",
    ),
    (
        "W4",
        "join_ms",
        "last wide step complete → task complete, ms",
    ),
    (
        "W5",
        "best_rate_tasks_per_s",
        "highest rate that keeps up, tasks/s",
    ),
    ("W5", "hop_p50_ms", "hop p50 at that rate, ms"),
    ("W5", "hop_p99_ms", "hop p99 at that rate, ms"),
    ("W5", "e2e_p99_ms", "task end to end p99 at that rate, ms"),
    ("W6", "lateness_p50_ms", "retry lateness p50, ms"),
    ("W6", "makespan_ms", "makespan, ms"),
];

pub fn markdown(
    machine: &Value,
    setup: &Value,
    aggregates: &[Aggregate],
    cal: &Calibration,
    targets: &[Target],
) -> String {
    let mut s = String::new();
    let pg = &machine["postgres"];
    let _ = writeln!(s, "## Weft benchmark\n");
    let _ = writeln!(
        s,
        "Machine: {} cores ({}), {} GiB, Linux {}. PostgreSQL {} ({}): synchronous_commit={}, fsync={}, \
         full_page_writes={}, shared_buffers={}, track_commit_timestamp={}.",
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        pg["server_version"].as_str().unwrap_or("?"),
        pg["server"].as_str().unwrap_or("?"),
        pg["synchronous_commit"].as_str().unwrap_or("?"),
        pg["fsync"].as_str().unwrap_or("?"),
        pg["full_page_writes"].as_str().unwrap_or("?"),
        pg["shared_buffers"].as_str().unwrap_or("?"),
        pg["track_commit_timestamp"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "Processes: 1 orchestrator ({}), worker processes with {} ({} build); W1 also with 2 workers, \
         W7 with 2. Runs per workload: {}; figures are medians across runs, percentiles over all samples.\n",
        flags(&setup["orchestrator_flags"]),
        flags(&setup["worker_flags"]),
        setup["build"].as_str().unwrap_or("?"),
        setup["runs"],
    );
    match (cal.l_ms, cal.u_steps_per_s) {
        (Some(l), Some(u)) => {
            let _ = writeln!(
                s,
                "Calibration (W0): L = {l:.2} ms per step, U = {u:.0} steps/s.\n"
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "Calibration (W0) not run: ratios and relative targets are not evaluated.\n"
            );
        }
    }
    let probes: Vec<String> = aggregates
        .iter()
        .map(|a| {
            let per_run: Vec<String> = a
                .info
                .iter()
                .map(|i| i["commit_p50_ms_before"].as_f64().map_or("?".into(), num))
                .collect();
            format!("{} [{}]", a.id, per_run.join(", "))
        })
        .collect();
    let _ = writeln!(
        s,
        "Durable commit p50 (ms) measured right before each run: {}.\n",
        probes.join("; ")
    );
    let _ = writeln!(s, "| workload | target | measured | limit | verdict |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for t in targets {
        let measured = t
            .measured
            .map_or("—".into(), |m| format!("{} {}", num(m), t.unit));
        let ratio = match (t.measured, t.limit_text.as_str()) {
            (Some(m), text) if text.ends_with(" L") => {
                cal.l_ms.map(|l| format!(" ({:.2} L)", m / l))
            }
            (Some(m), text) if text.ends_with(" U") => {
                cal.u_steps_per_s.map(|u| format!(" ({:.2} U)", m / u))
            }
            _ => None,
        }
        .unwrap_or_default();
        let limit = t
            .limit
            .map_or(format!("{} {}", t.cmp.symbol(), t.limit_text), |l| {
                if t.limit_text.ends_with(" L") || t.limit_text.ends_with(" U") {
                    format!(
                        "{} {} = {} {}",
                        t.cmp.symbol(),
                        t.limit_text,
                        num(l),
                        t.unit
                    )
                } else {
                    format!("{} {}", t.cmp.symbol(), t.limit_text)
                }
            });
        let _ = writeln!(
            s,
            "| {} | {} | {measured}{ratio} | {limit} | {} |",
            t.workload,
            t.what,
            t.verdict()
        );
    }
    let _ = writeln!(s, "\n| workload | figure | measured |");
    let _ = writeln!(s, "|---|---|---|");
    for (id, key, label) in HEADLINES {
        if let Some(v) = aggregates
            .iter()
            .find(|a| a.id == *id)
            .and_then(|a| a.figures.get(*key))
        {
            let _ = writeln!(s, "| {id} | {label} | {} |", num(*v));
        }
    }
    for a in aggregates {
        for (role, kib) in &a.memory_kib {
            let _ = writeln!(
                s,
                "| {} | peak RSS of the {role} processes, MiB | {:.1} |",
                a.id,
                *kib as f64 / 1024.0
            );
        }
        for (name, (pass, _)) in &a.checks {
            if !pass {
                let _ = writeln!(s, "| {} | check {name} | FAILED |", a.id);
            }
        }
        for e in &a.errors {
            let _ = writeln!(
                s,
                "| {} | error | {} |",
                a.id,
                e.replace('|', "/").replace('\n', " ")
            );
        }
    }
    s
}

fn flags(v: &Value) -> String {
    let mut parts = Vec::new();
    for group in v.as_array().into_iter().flatten() {
        for f in group.as_array().into_iter().flatten() {
            if let Some(f) = f.as_str() {
                parts.push(f.to_owned());
            }
        }
    }
    parts.join(" ")
}

/// A one-line summary of a run, for progress.
pub fn brief(m: &Measured) -> String {
    let mut parts: Vec<String> = m
        .figures
        .iter()
        .take(8)
        .map(|(k, v)| format!("{k}={}", num(*v)))
        .collect();
    for (k, v) in &m.samples {
        if let Some(p) = percentile(v, 50.0) {
            parts.push(format!("{k}_p50={} ms", num(p)));
        }
    }
    for (k, (pass, _)) in &m.checks {
        if !pass {
            parts.push(format!("CHECK FAILED: {k}"));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w5_latency_target_takes_the_fastest_level_within_the_limit_per_run() {
        let level = |keeps_up: bool, steps: f64, p99: f64| json!({ "keeps_up": keeps_up, "steps_per_s": steps, "hop_p99_ms": p99 });
        let info = vec![
            json!({ "levels": [level(true, 1000.0, 30.0), level(true, 1500.0, 80.0), level(false, 1600.0, 10.0)] }),
            json!({ "levels": [level(true, 1000.0, 90.0)] }),
            json!({ "levels": [level(true, 1000.0, 20.0), level(true, 1500.0, 40.0)] }),
        ];
        // Per run: 1000 (1500 is too slow, 1600 fell behind), 0, 1500.
        assert_eq!(w5_within_latency(&info, 50.0), Some(1000.0));
        assert_eq!(w5_within_latency(&[], 50.0), None);
    }
}
