//! `weft bench --smoke` end to end: the real binary runs every workload at
//! tiny sizes against the test server (one database per workload, created
//! next to a fresh test database) and prints one JSON line per workload.

use std::time::Duration;

use serde_json::Value;

use crate::support;

/// The figures each workload's line must carry.
const FIGURES: &[(&str, &[&str])] = &[
    ("W0", &["step_p50_ms", "parallel_steps_per_s"]),
    (
        "W1",
        &[
            "stream_1w_tasks_per_s",
            "stream_2w_tasks_per_s",
            "drain_1w_tasks_per_s",
            "drain_2w_tasks_per_s",
        ],
    ),
    (
        "W2",
        &["hop_p50_ms", "hop_p99_ms", "e2e_p50_ms", "e2e_p99_ms"],
    ),
    ("W3", &["e2e_p50_ms", "e2e_p99_ms"]),
    ("W4", &["makespan_ms", "wide_steps_per_s", "join_enqueued"]),
    ("W5", &["invariant_violations"]),
    ("W6", &["lateness_p50_ms", "lateness_p99_ms", "makespan_ms"]),
    ("W7", &["orchestrator_tx_per_s", "worker1_cpu_pct"]),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_run_reports_every_workload() {
    let url = support::fresh_database().await;
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["bench", "--smoke", "--w7-secs", "2", "--database-url", &url])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("weft bench --smoke did not finish in 5 minutes")
    .expect("run weft bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(output.status.success(), "weft bench failed\n{context}");

    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect();
    let machine = &lines[0]["machine"];
    assert!(machine["cores"].as_u64().unwrap_or(0) >= 1, "{context}");
    assert!(
        machine["postgres"]["synchronous_commit"].is_string(),
        "{context}"
    );
    for (id, figures) in FIGURES {
        let line = lines
            .iter()
            .find(|l| l["workload"] == *id)
            .unwrap_or_else(|| panic!("no line for {id}\n{context}"));
        assert_eq!(line["runs"], 1, "{id}\n{context}");
        assert_eq!(line["errors"], serde_json::json!([]), "{id}\n{context}");
        for figure in *figures {
            assert!(
                line["figures"][figure].is_number(),
                "{id} has no figure {figure}\n{context}"
            );
        }
        let checks = line["checks"].as_object().expect("checks");
        for (name, check) in checks {
            assert_eq!(check["pass"], true, "{id} check {name}\n{context}");
        }
        assert!(line["targets"].is_array(), "{id}\n{context}");
        assert!(line["memory_kib"].is_object(), "{id}\n{context}");
    }
    let w4 = lines.iter().find(|l| l["workload"] == "W4").expect("W4");
    assert_eq!(w4["figures"]["join_enqueued"], 1.0, "{context}");
    assert_eq!(
        w4["checks"]["join_enqueued_once"]["pass"], true,
        "{context}"
    );
    let w5 = lines.iter().find(|l| l["workload"] == "W5").expect("W5");
    assert_eq!(w5["figures"]["invariant_violations"], 0.0, "{context}");
    assert!(
        stdout.contains("| workload | target | measured | limit | verdict |"),
        "no markdown table\n{context}"
    );
}
