//! The client commands end to end: an orchestrator and a worker as real
//! processes on a fresh database, and the real `weft` binary run the way a
//! person runs it, checking its output and exit status.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{Proc, free_port};
use crate::support;

const DIAMOND: &str = "\
namespace: cli
name: diamond
version: 1
steps:
  - name: validate
    handler: builtin.noop
  - name: charge
    handler: builtin.sleep
    config: { ms: 50 }
    depends_on: [validate]
  - name: reserve
    handler: builtin.noop
    depends_on: [validate]
  - name: ship
    handler: builtin.noop
    config: { carrier: post }
    depends_on: [charge, reserve]
";

const FAILING: &str = "\
namespace: cli
name: failing
version: 1
steps:
  - name: charge
    handler: builtin.fail
    config: { mode: permanent, times: 1 }
";

const SLOW: &str = "\
namespace: cli
name: slow
version: 1
steps:
  - name: nap
    handler: builtin.sleep
    config: { ms: 60000 }
";

/// A scratch directory, removed when dropped; also the client's `HOME`, so
/// no config file of the machine's user is read.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("weft-cli-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a scratch file");
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `weft` client as a user runs it, against `api`.
fn client(api: &str, home: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"));
    command
        .args(args)
        .env("WEFT_API_URL", api)
        .env("HOME", home)
        .env_remove("WEFT_TOKEN")
        .env_remove("WEFT_OUTPUT")
        .env_remove("WEFT_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn weft(api: &str, home: &Path, args: &[&str]) -> Output {
    let output = tokio::time::timeout(Duration::from_secs(60), client(api, home, args).output())
        .await
        .unwrap_or_else(|_| panic!("weft {args:?} did not finish in 60 s"))
        .expect("run weft");
    eprintln!(
        "$ weft {}\n{}{}[exit {:?}]",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        output.status.code()
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// Waits until `url` answers 200, with a deadline.
async fn wait_ready(url: &str) {
    let http = reqwest::Client::new();
    let ready = support::wait_until(Duration::from_secs(60), || async {
        matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    assert!(ready, "{url} not ready within 60 s");
}

/// The task id on the first line of `task create --wait`'s output.
fn created_id(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let id = first
        .strip_prefix("task ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no task id in {first:?}"));
    id.to_owned()
}

#[tokio::test]
async fn client_commands_against_real_processes() {
    let url = support::fresh_database().await;
    let api_addr = format!("127.0.0.1:{}", free_port());
    let worker_addr = format!("127.0.0.1:{}", free_port());
    let _orchestrator = Proc::spawn(
        &[
            "orchestrator",
            "--http-addr",
            &api_addr,
            "--migrate",
            "false",
        ],
        &url,
    );
    let _worker = Proc::spawn(
        &["worker", "--namespace", "cli", "--http-addr", &worker_addr],
        &url,
    );
    wait_ready(&format!("http://{api_addr}/health/ready")).await;
    wait_ready(&format!("http://{worker_addr}/health/ready")).await;
    let api = format!("http://{api_addr}");
    let scratch = Scratch::new();
    let home = scratch.0.as_path();

    // template apply: created, then unchanged, then a changed copy of the
    // same version is a conflict and the command fails.
    let diamond = scratch.file("diamond.yaml", DIAMOND);
    let out = weft(&api, home, &["template", "apply", &diamond]).await;
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("{diamond}  created cli/diamond@1\n"));
    let out = weft(&api, home, &["template", "apply", &diamond]).await;
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        format!("{diamond}  unchanged cli/diamond@1\n")
    );
    let changed = scratch.file("changed.yaml", &DIAMOND.replace("ms: 50", "ms: 60"));
    let typo = scratch.file(
        "typo.yaml",
        &DIAMOND.replace("[charge, reserve]", "[chrage]"),
    );
    let out = weft(
        &api,
        home,
        &["template", "apply", &diamond, &changed, &typo],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].ends_with("unchanged cli/diamond@1"), "{text}");
    assert!(
        lines[1].starts_with(&changed) && lines[1].contains("conflict: "),
        "{text}"
    );
    assert!(
        lines[2].contains(r#"invalid: steps[3].depends_on[0]: unknown step "chrage""#),
        "{text}"
    );

    // task create --wait: the live view, the outputs, exit 0.
    let out = weft(
        &api,
        home,
        &[
            "task",
            "create",
            "cli/diamond",
            "--input",
            r#"{"order":7}"#,
            "--wait",
        ],
    )
    .await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("→ complete"), "{text}");
    assert!(text.contains("\noutputs:\n"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("ship ") && l.contains(r#""carrier":"post""#)),
        "the final step's output is shown: {text}"
    );
    let id = created_id(&text);
    assert!(
        text.contains(&format!("task {id} complete after ")),
        "{text}"
    );

    // task list --output json: the API's JSON, holding the task.
    let out = weft(
        &api,
        home,
        &["task", "list", "--namespace", "cli", "--output", "json"],
    )
    .await;
    assert!(out.status.success());
    let list: Value = serde_json::from_str(&stdout(&out)).expect("task list prints JSON");
    let items = list["items"].as_array().expect("items");
    let task = items
        .iter()
        .find(|t| t["id"] == id.as_str())
        .expect("the task is listed");
    assert_eq!(task["state"], "complete");
    assert_eq!(task["template_name"], "diamond");

    // task explain: the summary paragraph first.
    let out = weft(&api, home, &["task", "explain", &id]).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).starts_with(&format!(
            "Task {id} is complete and every step is complete."
        )),
        "{}",
        stdout(&out)
    );

    // queue stats: a table naming the namespace's step queue.
    let out = weft(&api, home, &["queue", "stats"]).await;
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.starts_with("QUEUE "), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("weft_steps_cli ")),
        "{text}"
    );

    // --wait exit statuses: 1 for a task ending in error, 2 for a cancelled one.
    let failing = scratch.file("failing.yaml", FAILING);
    let slow = scratch.file("slow.yaml", SLOW);
    let out = weft(&api, home, &["template", "apply", &failing, &slow]).await;
    assert!(out.status.success());
    let out = weft(&api, home, &["task", "create", "cli/failing", "--wait"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("charge  error: "), "{}", stdout(&out));

    let waiting = client(&api, home, &["task", "create", "cli/slow", "--wait"])
        .spawn()
        .expect("spawn weft");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let slow_id = loop {
        let out = weft(
            &api,
            home,
            &["task", "list", "--name", "slow", "--output", "json"],
        )
        .await;
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = list["items"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow task never showed up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = weft(
        &api,
        home,
        &["task", "cancel", &slow_id, "--reason", "cli test"],
    )
    .await;
    assert!(out.status.success());
    assert!(stdout(&out).starts_with(&format!("task {slow_id} cancelled\n")));
    let waited = tokio::time::timeout(Duration::from_secs(30), waiting.wait_with_output())
        .await
        .expect("--wait ends once the task is cancelled")
        .unwrap();
    assert_eq!(waited.status.code(), Some(2), "{}", stdout(&waited));

    // API errors: the problem's detail on stderr, exit 1.
    let missing = uuid::Uuid::nil().to_string();
    let out = weft(&api, home, &["task", "get", &missing]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), format!("error: task {missing} not found\n"));
    let out = weft(&api, home, &["task", "list", "--limit", "0"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: must be between 1 and 500\n  at limit\n"
    );

    // Nothing listening: the URL and the way out.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = weft(&nowhere, home, &["queue", "stats"]).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(
        text.starts_with(&format!("error: cannot reach the Weft API at {nowhere}/")),
        "{text}"
    );
    assert!(
        text.contains("weft dev") && text.contains("--api-url"),
        "{text}"
    );
}
