//! Per-step histograms for Prometheus: handler duration by namespace,
//! handler and outcome, and hop latency (enqueued by the orchestrator to
//! handler start) by namespace. Recorded once per handler run under a short
//! mutex; rendered on scrape.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

/// Upper bounds in seconds: from a sub-millisecond hop to a half-minute handler.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Cumulative counts per bucket are computed on render; these are per bucket.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        if let Some(i) = BUCKETS.iter().position(|bound| value <= *bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    durations: BTreeMap<(String, String, &'static str), Histogram>,
    hops: BTreeMap<String, Histogram>,
}

/// Cheap to clone; the dispatcher records, the metrics endpoint renders.
#[derive(Debug, Clone, Default)]
pub struct StepMetrics(Arc<Mutex<Inner>>);

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl StepMetrics {
    /// Records one handler run: its hop latency (negative clock skew counts
    /// as zero) and its duration.
    pub fn record(
        &self,
        namespace: &str,
        handler: &str,
        status: &'static str,
        hop_secs: f64,
        duration_secs: f64,
    ) {
        let Ok(mut inner) = self.0.lock() else { return };
        inner
            .hops
            .entry(namespace.to_owned())
            .or_default()
            .observe(hop_secs.max(0.0));
        inner
            .durations
            .entry((namespace.to_owned(), handler.to_owned(), status))
            .or_default()
            .observe(duration_secs.max(0.0));
    }

    /// Appends the histograms in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let Ok(inner) = self.0.lock() else { return };
        let _ = writeln!(
            out,
            "# HELP weft_step_duration_seconds Handler run time, by namespace, handler and outcome.\n# TYPE weft_step_duration_seconds histogram"
        );
        for ((namespace, handler, status), h) in &inner.durations {
            let labels = format!(
                "namespace=\"{}\",handler=\"{}\",status=\"{status}\"",
                label(namespace),
                label(handler)
            );
            h.render(out, "weft_step_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP weft_hop_latency_seconds Time from the orchestrator enqueuing a step to its handler starting.\n# TYPE weft_hop_latency_seconds histogram"
        );
        for (namespace, h) in &inner.hops {
            h.render(
                out,
                "weft_hop_latency_seconds",
                &format!("namespace=\"{}\"", label(namespace)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labelled() {
        let m = StepMetrics::default();
        m.record("shop", "shop.charge", "success", 0.002, 0.3);
        m.record("shop", "shop.charge", "success", 0.0004, 2.0);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "weft_step_duration_seconds_bucket{namespace=\"shop\",handler=\"shop.charge\",status=\"success\",le=\"0.5\"} 1\n"
        ));
        assert!(out.contains(
            "weft_step_duration_seconds_bucket{namespace=\"shop\",handler=\"shop.charge\",status=\"success\",le=\"+Inf\"} 2\n"
        ));
        assert!(
            out.contains("weft_hop_latency_seconds_bucket{namespace=\"shop\",le=\"0.0005\"} 1\n")
        );
        assert!(out.contains("weft_hop_latency_seconds_count{namespace=\"shop\"} 2\n"));
    }
}
