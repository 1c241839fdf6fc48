//! Human output: pure functions from the API's JSON to text, so every shape
//! is tested without a server. Missing or null fields print as `-`; the
//! client never fails because the API added or dropped a field.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

/// Longest JSON value shown in a table cell before it is cut with `…`.
const CELL_CHARS: usize = 60;

/// A plain-text table: columns two spaces apart, no trailing blanks.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header line; an empty `headers` means no header line.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            ..Table::default()
        }
    }

    /// Right-aligns a column (numbers).
    pub fn right(mut self, column: usize) -> Table {
        self.right.push(column);
        self
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut lines: Vec<Vec<String>> = Vec::new();
        if !self.headers.is_empty() {
            lines.push(self.headers.iter().map(|h| (*h).to_owned()).collect());
        }
        lines.extend(self.rows.iter().cloned());
        let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .filter_map(|l| l.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for line in &lines {
            let mut text = String::new();
            for (c, cell) in line.iter().enumerate() {
                if c > 0 {
                    text.push_str("  ");
                }
                let pad = " ".repeat(widths[c] - cell.chars().count());
                if self.right.contains(&c) {
                    text.push_str(&pad);
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&pad);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A field as text: strings bare, numbers and booleans as written, null or
/// missing as `-`, anything else as compact JSON.
fn text(value: &Value, key: &str) -> String {
    cell(value.get(key).unwrap_or(&Value::Null))
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Compact JSON, cut to `max` characters.
fn compact(value: &Value, max: usize) -> String {
    let full = value.to_string();
    if full.chars().count() <= max {
        return full;
    }
    let mut cut: String = full.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// An RFC 3339 timestamp to the second, in UTC; `-` when absent.
pub fn timestamp(value: &Value) -> String {
    match value.as_str().map(DateTime::parse_from_rfc3339) {
        Some(Ok(at)) => at
            .with_timezone(&Utc)
            .to_rfc3339_opts(SecondsFormat::Secs, true),
        Some(Err(_)) => cell(value),
        None => "-".into(),
    }
}

fn items(list: &Value) -> &[Value] {
    list.get("items")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn template_label(namespace: &Value, name: &Value, version: &Value) -> String {
    format!("{}/{}@{}", cell(namespace), cell(name), cell(version))
}

/// An error's reason and message (`permanent: card declined`).
fn error_text(error: &Value) -> String {
    let reason = error.get("reason").and_then(Value::as_str);
    let message = error.get("message").and_then(Value::as_str);
    match (reason, message) {
        (Some(r), Some(m)) => format!("{r}: {m}"),
        (None, Some(m)) => m.to_owned(),
        (Some(r), None) => r.to_owned(),
        (None, None) => compact(error, CELL_CHARS),
    }
}

/// An API error for stderr: `error: <detail>` and `  at <path>` per field.
pub fn problem(status: u16, body: &Value) -> String {
    let detail = body
        .get("detail")
        .and_then(Value::as_str)
        .or_else(|| body.get("title").and_then(Value::as_str));
    let mut out = match (detail, body) {
        (Some(d), _) => format!("error: {d}"),
        (None, Value::String(s)) if !s.trim().is_empty() => {
            format!("error: HTTP {status}: {}", s.trim())
        }
        _ => format!("error: HTTP {status}"),
    };
    out.push('\n');
    for error in body
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let path = error.get("path").and_then(Value::as_str).unwrap_or("");
        let message = error.get("message").and_then(Value::as_str);
        if !path.is_empty() {
            out.push_str(&format!("  at {path}"));
            if message.is_some_and(|m| Some(m) != detail) {
                out.push_str(&format!(": {}", message.unwrap_or("")));
            }
            out.push('\n');
        }
    }
    out
}

/// One file's answer from `POST /v1/templates`.
#[derive(Debug, Clone)]
pub struct Applied {
    pub file: String,
    pub status: u16,
    pub body: Value,
}

impl Applied {
    /// Whether the file is registered with exactly this content.
    pub fn succeeded(&self) -> bool {
        matches!(self.status, 200 | 201)
    }
}

/// `weft template apply`: one line per file.
pub fn apply_results(results: &[Applied]) -> String {
    let mut table = Table::new(&[]);
    for result in results {
        let body = &result.body;
        let label = || template_label(&body["namespace"], &body["name"], &body["version"]);
        let detail = || {
            body.get("detail")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let outcome = match result.status {
            201 => format!("created {}", label()),
            200 => format!("unchanged {}", label()),
            409 => format!("conflict: {}", detail()),
            400 | 422 => {
                let path = body
                    .pointer("/errors/0/path")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if path.is_empty() {
                    format!("invalid: {}", detail())
                } else {
                    format!("invalid: {path}: {}", detail())
                }
            }
            status => problem(status, body).trim_end().to_owned(),
        };
        table.row(vec![result.file.clone(), outcome]);
    }
    table.render()
}

/// `weft template list`.
pub fn template_table(list: &Value) -> String {
    let mut table = Table::new(&["TEMPLATE", "STEPS", "CREATED", "DESCRIPTION"]).right(1);
    for t in items(list) {
        let steps = t
            .pointer("/definition/steps")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        table.row(vec![
            template_label(&t["namespace"], &t["name"], &t["version"]),
            steps.to_string(),
            timestamp(&t["created_at"]),
            text(&t["definition"], "description"),
        ]);
    }
    table.render()
}

/// `weft template show`.
pub fn template_view(template: &Value) -> String {
    let definition = &template["definition"];
    let mut head = Table::new(&[]);
    head.row(vec![
        "template".into(),
        template_label(
            &template["namespace"],
            &template["name"],
            &template["version"],
        ),
    ]);
    head.row(vec!["description".into(), text(definition, "description")]);
    head.row(vec!["on_failure".into(), text(definition, "on_failure")]);
    head.row(vec!["created".into(), timestamp(&template["created_at"])]);
    let mut steps = Table::new(&[
        "STEP",
        "HANDLER",
        "DEPENDS ON",
        "ATTEMPTS",
        "TIMEOUT",
        "CONFIG",
    ])
    .right(3);
    for step in definition
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let depends: Vec<String> = step
            .get("depends_on")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(cell)
            .collect();
        let timeout = step
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map_or_else(|| "-".into(), millis);
        steps.row(vec![
            text(step, "name"),
            text(step, "handler"),
            if depends.is_empty() {
                "-".into()
            } else {
                depends.join(", ")
            },
            cell(step.pointer("/retry/max_attempts").unwrap_or(&Value::Null)),
            timeout,
            compact(step.get("config").unwrap_or(&Value::Null), CELL_CHARS),
        ]);
    }
    format!("{}\n{}", head.render(), steps.render())
}

/// A duration in milliseconds the way templates spell it (`30s`, `250ms`).
fn millis(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 && ms > 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 && ms > 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 && ms > 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// `weft task list`: the page, then the cursor of the next one.
pub fn task_table(list: &Value) -> String {
    let mut table = Table::new(&["ID", "TEMPLATE", "STATE", "CREATED", "FINISHED"]);
    for t in items(list) {
        table.row(vec![
            text(t, "id"),
            template_label(&t["namespace"], &t["template_name"], &t["template_version"]),
            text(t, "state"),
            timestamp(&t["created_at"]),
            timestamp(&t["finished_at"]),
        ]);
    }
    let mut out = table.render();
    if let Some(cursor) = list.get("next_cursor").and_then(Value::as_str) {
        out.push_str(&format!("next page: --cursor {cursor}\n"));
    }
    out
}

/// What a step has to show: its output once done, else its last error.
fn step_result(step: &Value) -> String {
    let state = step.get("state").and_then(Value::as_str).unwrap_or("");
    match (state, step.get("output"), step.get("last_error")) {
        ("complete" | "resolved", Some(output), _) if !output.is_null() => {
            compact(output, CELL_CHARS)
        }
        ("waiting_retry", _, Some(error)) if !error.is_null() => format!(
            "retry at {}; {}",
            timestamp(&step["next_attempt_at"]),
            error_text(error)
        ),
        (_, _, Some(error)) if !error.is_null() => error_text(error),
        _ => "-".into(),
    }
}

/// `weft task get` (and the answer of cancel, retry-step, resolve-step).
pub fn task_view(task: &Value) -> String {
    let mut head = Table::new(&[]);
    let status = match task.get("execution_status").and_then(Value::as_str) {
        Some(s) => format!("{} ({s})", text(task, "state")),
        None => text(task, "state"),
    };
    let rows = [
        ("task", text(task, "id")),
        (
            "template",
            template_label(
                &task["namespace"],
                &task["template_name"],
                &task["template_version"],
            ),
        ),
        ("state", status),
        ("priority", text(task, "priority")),
        ("created", timestamp(&task["created_at"])),
        ("started", timestamp(&task["started_at"])),
        ("finished", timestamp(&task["finished_at"])),
        (
            "input",
            compact(task.get("input").unwrap_or(&Value::Null), CELL_CHARS),
        ),
    ];
    for (key, value) in rows {
        head.row(vec![key.into(), value]);
    }
    let mut steps = Table::new(&["STEP", "STATE", "ATTEMPTS", "HANDLER", "RESULT"]).right(2);
    for step in task
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        steps.row(vec![
            text(step, "name"),
            text(step, "state"),
            format!("{}/{}", text(step, "attempts"), text(step, "max_attempts")),
            text(step, "handler"),
            step_result(step),
        ]);
    }
    format!("{}\n{}", head.render(), steps.render())
}

/// `weft task explain`: the summary paragraph, then the structured parts.
pub fn explain(explanation: &Value) -> String {
    let mut out = text(explanation, "summary");
    out.push('\n');
    let list = |key: &str| -> Vec<&Value> {
        explanation
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect()
    };
    let names = |key: &str| -> String {
        list(key)
            .into_iter()
            .map(cell)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Table::new(&[]);
    let mut section = |label: &str, lines: Vec<String>| {
        for (i, line) in lines.into_iter().enumerate() {
            let label = if i == 0 {
                format!("{label}:")
            } else {
                String::new()
            };
            parts.row(vec![label, line]);
        }
    };
    section(
        "failed",
        list("failed")
            .into_iter()
            .map(|f| {
                let error = match f.get("error") {
                    Some(e) if !e.is_null() => error_text(e),
                    _ => "no error recorded".into(),
                };
                format!("{} ({}): {error}", text(f, "step"), text(f, "state"))
            })
            .collect(),
    );
    for (label, key) in [("ready", "ready"), ("in flight", "in_flight")] {
        let joined = names(key);
        section(
            label,
            if joined.is_empty() {
                vec![]
            } else {
                vec![joined]
            },
        );
    }
    section(
        "waiting",
        list("waiting")
            .into_iter()
            .map(|w| {
                let on: Vec<String> = w
                    .get("waiting_on")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(cell)
                    .collect();
                if on.is_empty() {
                    text(w, "step")
                } else {
                    format!("{} on {}", text(w, "step"), on.join(", "))
                }
            })
            .collect(),
    );
    section(
        "retries",
        list("retries")
            .into_iter()
            .map(|r| {
                format!(
                    "{} attempt {} at {} (in {} ms)",
                    text(r, "step"),
                    text(r, "attempt"),
                    timestamp(&r["due_at"]),
                    text(r, "due_in_ms")
                )
            })
            .collect(),
    );
    let parts = parts.render();
    if !parts.is_empty() {
        out.push('\n');
        out.push_str(&parts);
    }
    out
}

/// `weft task history`.
pub fn history(list: &Value) -> String {
    let mut table = Table::new(&["AT", "STEP", "ATTEMPT", "CHANGE", "REASON"]).right(2);
    for entry in items(list) {
        let from = text(entry, "from_state");
        let change = match entry.get("kind").and_then(Value::as_str) {
            Some("stale_result") => format!("stale result dropped (step was {from})"),
            _ if from == "-" => format!("→ {}", text(entry, "to_state")),
            _ => format!("{from} → {}", text(entry, "to_state")),
        };
        let step = match entry.get("step").and_then(Value::as_str) {
            Some(step) => step.to_owned(),
            None => "(task)".into(),
        };
        table.row(vec![
            timestamp(&entry["at"]),
            step,
            text(entry, "attempt"),
            change,
            text(entry, "reason"),
        ]);
    }
    table.render()
}

/// `weft queue stats`.
pub fn queue_stats(list: &Value) -> String {
    let mut table = Table::new(&["QUEUE", "DEPTH", "IN FLIGHT", "OLDEST"])
        .right(1)
        .right(2)
        .right(3);
    for q in items(list) {
        let oldest = match q.get("oldest_message_age_seconds").and_then(Value::as_f64) {
            Some(age) if age > 0.0 => format!("{age:.1}s"),
            Some(_) => "-".into(),
            None => text(q, "oldest_message_age_seconds"),
        };
        table.row(vec![
            text(q, "queue"),
            text(q, "depth"),
            text(q, "in_flight"),
            oldest,
        ]);
    }
    table.render()
}

/// `weft dlq list`.
pub fn dead_letters(list: &Value) -> String {
    let mut table = Table::new(&["ID", "DEAD LETTERED", "REASON", "TASK", "STEP", "DETAIL"]);
    for d in items(list) {
        table.row(vec![
            text(d, "id"),
            timestamp(&d["dead_lettered_at"]),
            text(d, "reason"),
            text(d, "task_id"),
            text(d, "step"),
            match d.get("detail") {
                Some(Value::String(s)) => s.clone(),
                Some(other) if !other.is_null() => compact(other, CELL_CHARS),
                _ => "-".into(),
            },
        ]);
    }
    table.render()
}

/// `weft dlq replay`.
pub fn replayed(answer: &Value) -> String {
    format!(
        "replayed {}: step {} of task {} runs again\n",
        text(answer, "replayed"),
        text(answer, "step"),
        text(answer, "task_id")
    )
}

/// A step's (state, attempts) by name, and the task's state.
fn snapshot(task: &Value) -> (String, BTreeMap<String, (String, String, Value)>) {
    let steps = task
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|s| {
            (
                text(s, "name"),
                (
                    text(s, "state"),
                    text(s, "attempts"),
                    s.get("last_error").cloned().unwrap_or(Value::Null),
                ),
            )
        })
        .collect();
    (text(task, "state"), steps)
}

/// The live view of `weft task create --wait`: a line per change between two
/// reads of the task (every step and the task itself when `before` is None),
/// in the task's step order.
pub fn changes(before: Option<&Value>, after: &Value, elapsed: Duration) -> Vec<String> {
    let (old_state, old_steps) = before.map(snapshot).unwrap_or_default();
    let (new_state, _) = snapshot(after);
    let steps: Vec<&Value> = after
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let width = steps
        .iter()
        .map(|s| text(s, "name").chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    let at = format!("{:>7.3}s", elapsed.as_secs_f64());
    let arrow = |from: Option<&str>, to: &str| match from {
        Some(from) => format!("{from} → {to}"),
        None => to.to_owned(),
    };
    let mut lines = Vec::new();
    for step in steps {
        let name = text(step, "name");
        let (state, attempts, error) = (
            text(step, "state"),
            text(step, "attempts"),
            step.get("last_error").unwrap_or(&Value::Null),
        );
        let previous = old_steps.get(&name);
        if previous.is_some_and(|(s, a, _)| *s == state && *a == attempts) {
            continue;
        }
        let mut note = String::new();
        if attempts != "0" && attempts != "-" {
            note = format!("attempt {attempts}");
            if matches!(state.as_str(), "waiting_retry" | "error") && !error.is_null() {
                note.push_str(&format!(": {}", error_text(error)));
            }
            note = format!("  ({note})");
        }
        lines.push(format!(
            "{at}  {name:<width$}  {}{note}",
            arrow(previous.map(|(s, _, _)| s.as_str()), &state)
        ));
    }
    if before.is_none() || old_state != new_state {
        let from = before.map(|_| old_state.as_str());
        lines.push(format!(
            "{at}  {:<width$}  {}",
            "task",
            arrow(from, &new_state)
        ));
    }
    lines
}

/// What a finished task produced: each step's output, or its error.
pub fn outputs(task: &Value) -> String {
    let mut table = Table::new(&[]);
    for step in task
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let result = match (step.get("output"), step.get("last_error")) {
            (Some(output), _) if !output.is_null() => output.to_string(),
            (_, Some(error)) if !error.is_null() => {
                format!("{}: {}", text(step, "state"), error_text(error))
            }
            _ => text(step, "state"),
        };
        table.row(vec![format!("  {}", text(step, "name")), result]);
    }
    format!("outputs:\n{}", table.render())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn task() -> Value {
        json!({
            "id": "0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11",
            "namespace": "demo",
            "template_name": "diamond",
            "template_version": 1,
            "state": "running",
            "execution_status": "blocked_by_failures",
            "on_failure": "continue",
            "input": {"order": 7},
            "priority": 0,
            "created_at": "2026-01-02T03:04:05.678901Z",
            "started_at": "2026-01-02T03:04:05.700000Z",
            "finished_at": null,
            "steps": [
                {"name": "validate", "handler": "builtin.noop", "state": "complete", "attempts": 1,
                 "max_attempts": 3, "output": {"ok": true}, "last_error": null, "next_attempt_at": null},
                {"name": "charge", "handler": "shop.charge", "state": "error", "attempts": 3,
                 "max_attempts": 3, "output": null,
                 "last_error": {"reason": "permanent", "message": "card declined"}, "next_attempt_at": null},
                {"name": "reserve", "handler": "shop.reserve", "state": "waiting_retry", "attempts": 1,
                 "max_attempts": 5, "output": null,
                 "last_error": {"reason": "retryable", "message": "stock service down"},
                 "next_attempt_at": "2026-01-02T03:04:09.100Z"},
                {"name": "ship", "handler": "builtin.noop", "state": "pending", "attempts": 0,
                 "max_attempts": 3, "output": null, "last_error": null, "next_attempt_at": null}
            ]
        })
    }

    #[test]
    fn table_aligns_columns_and_trims_trailing_blanks() {
        let mut table = Table::new(&["NAME", "N", "NOTE"]).right(1);
        table.row(vec!["a".into(), "7".into(), "-".into()]);
        table.row(vec!["longer→".into(), "1234".into(), "".into()]);
        assert_eq!(
            table.render(),
            "NAME        N  NOTE\n\
             a           7  -\n\
             longer→  1234\n"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_seconds_in_utc() {
        assert_eq!(
            timestamp(&json!("2026-01-02T03:04:05.999Z")),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(
            timestamp(&json!("2026-01-02T04:04:05+01:00")),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(timestamp(&Value::Null), "-");
        assert_eq!(timestamp(&json!("yesterday")), "yesterday");
    }

    #[test]
    fn task_table_with_next_cursor() {
        let mut other = task();
        other["id"] = json!("0190f7c4-0000-7000-8000-000000000002");
        other["template_name"] = json!("chain");
        other["state"] = json!("complete");
        other["finished_at"] = json!("2026-01-02T03:04:07.5Z");
        let list = json!({ "items": [task(), other], "next_cursor": "1767323045678901_0190f7c4" });
        assert_eq!(
            task_table(&list),
            "ID                                    TEMPLATE        STATE     CREATED               FINISHED\n\
             0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11  demo/diamond@1  running   2026-01-02T03:04:05Z  -\n\
             0190f7c4-0000-7000-8000-000000000002  demo/chain@1    complete  2026-01-02T03:04:05Z  2026-01-02T03:04:07Z\n\
             next page: --cursor 1767323045678901_0190f7c4\n"
        );
        assert_eq!(
            task_table(&json!({ "items": [], "next_cursor": null })),
            "ID  TEMPLATE  STATE  CREATED  FINISHED\n"
        );
    }

    #[test]
    fn task_view_with_steps() {
        assert_eq!(
            task_view(&task()),
            "task      0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11\n\
             template  demo/diamond@1\n\
             state     running (blocked_by_failures)\n\
             priority  0\n\
             created   2026-01-02T03:04:05Z\n\
             started   2026-01-02T03:04:05Z\n\
             finished  -\n\
             input     {\"order\":7}\n\
             \n\
             STEP      STATE          ATTEMPTS  HANDLER       RESULT\n\
             validate  complete            1/3  builtin.noop  {\"ok\":true}\n\
             charge    error               3/3  shop.charge   permanent: card declined\n\
             reserve   waiting_retry       1/5  shop.reserve  retry at 2026-01-02T03:04:09Z; retryable: stock service down\n\
             ship      pending             0/3  builtin.noop  -\n"
        );
    }

    #[test]
    fn long_outputs_are_cut_in_tables() {
        let mut t = task();
        t["steps"][0]["output"] = json!({ "blob": "x".repeat(100) });
        let view = task_view(&t);
        let line = view.lines().find(|l| l.starts_with("validate")).unwrap();
        assert!(line.ends_with("xxx…"), "{line}");
        assert_eq!(line.split("  ").last().unwrap().chars().count(), CELL_CHARS);
    }

    #[test]
    fn template_apply_results() {
        let results = [
            Applied {
                file: "examples/diamond.yaml".into(),
                status: 201,
                body: json!({"id": 1, "namespace": "demo", "name": "diamond", "version": 1}),
            },
            Applied {
                file: "examples/chain.yaml".into(),
                status: 200,
                body: json!({"id": 2, "namespace": "demo", "name": "chain", "version": 1}),
            },
            Applied {
                file: "diamond-v1-edited.yaml".into(),
                status: 409,
                body: json!({"type": "https://weft.dev/problems/conflict", "title": "conflict", "status": 409,
                             "detail": "template demo/diamond version 1 exists with different content"}),
            },
            Applied {
                file: "typo.yaml".into(),
                status: 422,
                body: json!({"title": "invalid request", "status": 422, "detail": "unknown step \"chrage\"",
                             "errors": [{"path": "steps[2].depends_on[0]", "message": "unknown step \"chrage\""}]}),
            },
            Applied {
                file: "binary.yaml".into(),
                status: 400,
                body: json!({"title": "invalid request", "status": 400, "detail": "body is not UTF-8",
                             "errors": [{"path": "", "message": "body is not UTF-8"}]}),
            },
            Applied {
                file: "down.yaml".into(),
                status: 503,
                body: json!({"title": "unavailable", "status": 503, "detail": "the database is unreachable; retry later"}),
            },
        ];
        assert_eq!(
            apply_results(&results),
            "examples/diamond.yaml   created demo/diamond@1\n\
             examples/chain.yaml     unchanged demo/chain@1\n\
             diamond-v1-edited.yaml  conflict: template demo/diamond version 1 exists with different content\n\
             typo.yaml               invalid: steps[2].depends_on[0]: unknown step \"chrage\"\n\
             binary.yaml             invalid: body is not UTF-8\n\
             down.yaml               error: the database is unreachable; retry later\n"
        );
        assert!(results[..2].iter().all(Applied::succeeded));
        assert!(!results[2..].iter().any(Applied::succeeded));
    }

    #[test]
    fn explain_prints_summary_then_parts() {
        let explanation = json!({
            "task_id": "0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11",
            "state": "running",
            "execution_status": "blocked_by_failures",
            "summary": "Task 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 is running and blocked by failures: `charge` (error, permanent: card declined) cannot complete. Retry or resolve the failed steps to let it continue.",
            "failed": [{"step": "charge", "state": "error", "error": {"reason": "permanent", "message": "card declined"}}],
            "ready": ["audit", "notify"],
            "in_flight": [],
            "waiting": [{"step": "ship", "waiting_on": ["charge", "reserve"]}, {"step": "archive", "waiting_on": ["ship"]}],
            "retries": [{"step": "reserve", "attempt": 2, "due_at": "2026-01-02T03:04:09.100Z", "due_in_ms": 412}]
        });
        assert_eq!(
            explain(&explanation),
            "Task 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 is running and blocked by failures: `charge` (error, permanent: card declined) cannot complete. Retry or resolve the failed steps to let it continue.\n\
             \n\
             failed:   charge (error): permanent: card declined\n\
             ready:    audit, notify\n\
             waiting:  ship on charge, reserve\n          archive on ship\n\
             retries:  reserve attempt 2 at 2026-01-02T03:04:09Z (in 412 ms)\n"
        );
        let done = json!({"summary": "Task x is complete and every step is complete.", "failed": [],
                          "ready": [], "in_flight": [], "waiting": [], "retries": []});
        assert_eq!(
            explain(&done),
            "Task x is complete and every step is complete.\n"
        );
    }

    #[test]
    fn queue_stats_table() {
        let stats = json!({"items": [
            {"queue": "weft_steps_demo", "depth": 3, "in_flight": 12, "oldest_message_age_seconds": 4.25},
            {"queue": "weft_results", "depth": 0, "in_flight": 0, "oldest_message_age_seconds": 0.0}
        ]});
        assert_eq!(
            queue_stats(&stats),
            "QUEUE            DEPTH  IN FLIGHT  OLDEST\n\
             weft_steps_demo      3         12    4.2s\n\
             weft_results         0          0       -\n"
        );
    }

    #[test]
    fn problem_errors() {
        let invalid = json!({
            "type": "https://weft.dev/problems/invalid-request", "title": "invalid request", "status": 422,
            "detail": "must be between 1 and 500", "errors": [{"path": "limit", "message": "must be between 1 and 500"}]
        });
        assert_eq!(
            problem(422, &invalid),
            "error: must be between 1 and 500\n  at limit\n"
        );
        let not_found = json!({"type": "https://weft.dev/problems/not-found", "title": "not found", "status": 404,
                               "detail": "task 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 not found"});
        assert_eq!(
            problem(404, &not_found),
            "error: task 0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11 not found\n"
        );
        let several = json!({"detail": "2 problems", "errors": [
            {"path": "tasks[0].namespace", "message": "is empty"}, {"path": "", "message": "ignored"}]});
        assert_eq!(
            problem(422, &several),
            "error: 2 problems\n  at tasks[0].namespace: is empty\n"
        );
        assert_eq!(
            problem(502, &json!("Bad Gateway\n")),
            "error: HTTP 502: Bad Gateway\n"
        );
        assert_eq!(problem(404, &Value::Null), "error: HTTP 404\n");
    }

    #[test]
    fn live_view_prints_changes_only() {
        let mut before = task();
        before["state"] = json!("running");
        let first = changes(None, &before, Duration::from_millis(0));
        assert_eq!(
            first,
            [
                "  0.000s  validate  complete  (attempt 1)",
                "  0.000s  charge    error  (attempt 3: permanent: card declined)",
                "  0.000s  reserve   waiting_retry  (attempt 1: retryable: stock service down)",
                "  0.000s  ship      pending",
                "  0.000s  task      running",
            ]
        );
        let mut after = before.clone();
        after["steps"][2]["state"] = json!("enqueued");
        after["steps"][2]["attempts"] = json!(2);
        assert_eq!(
            changes(Some(&before), &after, Duration::from_millis(412)),
            ["  0.412s  reserve   waiting_retry → enqueued  (attempt 2)"]
        );
        let mut done = after.clone();
        done["state"] = json!("error");
        assert_eq!(
            changes(Some(&after), &done, Duration::from_millis(1_250)),
            ["  1.250s  task      running → error"]
        );
        assert!(changes(Some(&done), &done, Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn outputs_of_a_finished_task() {
        assert_eq!(
            outputs(&task()),
            "outputs:\n  \
             validate  {\"ok\":true}\n  \
             charge    error: permanent: card declined\n  \
             reserve   waiting_retry: retryable: stock service down\n  \
             ship      pending\n"
        );
    }

    #[test]
    fn template_list_and_show() {
        let template = json!({
            "id": 1, "namespace": "demo", "name": "diamond", "version": 1,
            "created_at": "2026-01-02T03:04:05.5Z",
            "definition": {"namespace": "demo", "name": "diamond", "version": 1,
                "description": "Validate, charge and reserve in parallel, then ship.", "on_failure": "fail_fast",
                "steps": [
                    {"name": "validate", "handler": "builtin.noop", "config": {}, "depends_on": [],
                     "timeout_ms": 30000, "retry": {"max_attempts": 3}},
                    {"name": "ship", "handler": "builtin.noop", "config": {"carrier": "post"},
                     "depends_on": ["charge", "reserve"], "timeout_ms": 1500, "retry": {"max_attempts": 1}}
                ]}
        });
        assert_eq!(
            template_table(&json!({ "items": [template.clone()] })),
            "TEMPLATE        STEPS  CREATED               DESCRIPTION\n\
             demo/diamond@1      2  2026-01-02T03:04:05Z  Validate, charge and reserve in parallel, then ship.\n"
        );
        assert_eq!(
            template_view(&template),
            "template     demo/diamond@1\n\
             description  Validate, charge and reserve in parallel, then ship.\n\
             on_failure   fail_fast\n\
             created      2026-01-02T03:04:05Z\n\
             \n\
             STEP      HANDLER       DEPENDS ON       ATTEMPTS  TIMEOUT  CONFIG\n\
             validate  builtin.noop  -                       3  30s      {}\n\
             ship      builtin.noop  charge, reserve         1  1500ms   {\"carrier\":\"post\"}\n"
        );
    }

    #[test]
    fn history_and_dead_letters() {
        let entries = json!({"items": [
            {"at": "2026-01-02T03:04:05Z", "step": null, "attempt": null, "from_state": null,
             "to_state": "pending", "kind": "task_transition", "reason": "created", "detail": null},
            {"at": "2026-01-02T03:04:05.1Z", "step": null, "attempt": null, "from_state": "pending",
             "to_state": "running", "kind": "task_transition", "reason": "started", "detail": null},
            {"at": "2026-01-02T03:04:05.2Z", "step": "validate", "attempt": 1, "from_state": "pending",
             "to_state": "enqueued", "kind": "transition", "reason": null, "detail": null},
            {"at": "2026-01-02T03:04:06Z", "step": "validate", "attempt": 1, "from_state": "complete",
             "to_state": null, "kind": "stale_result", "reason": "fenced_off", "detail": {}}
        ]});
        assert_eq!(
            history(&entries),
            "AT                    STEP      ATTEMPT  CHANGE                                    REASON\n\
             2026-01-02T03:04:05Z  (task)          -  → pending                                 created\n\
             2026-01-02T03:04:05Z  (task)          -  pending → running                         started\n\
             2026-01-02T03:04:05Z  validate        1  pending → enqueued                        -\n\
             2026-01-02T03:04:06Z  validate        1  stale result dropped (step was complete)  fenced_off\n"
        );
        let letters = json!({"items": [{"id": "weft_dlq_demo:42", "queue": "weft_dlq_demo",
            "dead_lettered_at": "2026-01-02T03:04:05Z", "reason": "max_deliveries", "detail": "delivered 5 times",
            "task_id": "0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11", "step_id": "x", "step": "charge", "message": {}}]});
        assert_eq!(
            dead_letters(&letters),
            "ID                DEAD LETTERED         REASON          TASK                                  STEP    DETAIL\n\
             weft_dlq_demo:42  2026-01-02T03:04:05Z  max_deliveries  0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11  charge  delivered 5 times\n"
        );
        assert_eq!(
            replayed(&json!({"replayed": "weft_dlq_demo:42", "task_id": "0190", "step": "charge"})),
            "replayed weft_dlq_demo:42: step charge of task 0190 runs again\n"
        );
    }
}
