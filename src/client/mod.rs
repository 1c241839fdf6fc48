//! The client commands (`weft template|task|queue|dlq …`): thin callers of the
//! orchestrator's REST API over HTTP. Each command sends one or a few
//! requests and prints the answer, as plain-text tables (`render`, pure
//! functions) or as the API's JSON pretty-printed (`--output json`).
//!
//! Invariant: the client knows the API only through its JSON; it shares no
//! types with the orchestrator, so it works against any server version that
//! speaks the same wire format.
//!
//! Exit status: 0 on success, 1 when the command failed (an API problem, an
//! unreachable API, a template file refused); `task create --wait` exits 0
//! when the task completed, 1 when it ended in error, 2 when it was cancelled.

mod api;
mod render;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::config::{
    ClientArgs, DlqArgs, DlqCommand, OutputFormat, QueueArgs, QueueCommand, TaskArgs, TaskCommand,
    TemplateArgs, TemplateCommand,
};
use api::{Api, Body, Settings};
use render::Applied;

/// How often `task create --wait` reads the task.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// How long `task create --wait` keeps trying while the API is unreachable.
const WATCH_OUTAGE: Duration = Duration::from_secs(15);

/// Exit status of `task create --wait` for a cancelled task.
const EXIT_CANCELLED: u8 = 2;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the API (refused, unresolvable, timed out).
    #[error(
        "cannot reach the Weft API at {url}: {reason}\n  \
         is it running? `weft dev` serves one on http://127.0.0.1:8080; \
         otherwise point --api-url (or WEFT_API_URL) at your orchestrator"
    )]
    Unreachable { url: String, reason: String },
    /// The API answered with an error status, usually a problem document.
    #[error("the API answered {status}: {body}")]
    Problem { status: u16, body: Value },
    /// Any other transport failure.
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A command-line value the API would refuse anyway, caught early.
    #[error("{0}")]
    Usage(String),
}

/// What a failed command prints on stderr.
fn report(error: &Error) -> String {
    match error {
        Error::Problem { status, body } => render::problem(*status, body),
        other => format!("error: {other}\n"),
    }
}

/// Runs a command body, printing its error (if any) as the client does.
fn finish(result: Result<ExitCode, Error>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(report(&e).as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`weft task list | head`) is not an error.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// A connected client and how it prints.
struct Client {
    api: Api,
    output: OutputFormat,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Client, Error> {
        let settings = Settings::resolve(args)?;
        Ok(Client {
            api: Api::new(&settings)?,
            output: settings.output,
        })
    }

    /// Prints an answer: the human rendering, or the JSON as the API sent it.
    fn print(&self, body: &Value, human: impl FnOnce(&Value) -> String) {
        match self.output {
            OutputFormat::Table => emit(&human(body)),
            OutputFormat::Json => emit(&pretty(body)),
        }
    }
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

/// `weft template …`
pub async fn template(args: TemplateArgs) -> ExitCode {
    finish(run_template(args).await)
}

async fn run_template(args: TemplateArgs) -> Result<ExitCode, Error> {
    let client = Client::new(&args.client)?;
    let api = &client.api;
    match args.command {
        TemplateCommand::Apply { files } => {
            // Read every file first: a typo in the last name sends nothing.
            let mut bodies = Vec::with_capacity(files.len());
            for path in &files {
                let bytes = std::fs::read(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })?;
                bodies.push((path, bytes));
            }
            let mut results = Vec::with_capacity(bodies.len());
            for (path, bytes) in bodies {
                let content_type = api::template_content_type(path);
                let reply = api
                    .send(
                        Method::POST,
                        &["v1", "templates"],
                        &[],
                        Body::Raw {
                            bytes,
                            content_type,
                        },
                    )
                    .await?;
                results.push(Applied {
                    file: path.display().to_string(),
                    status: reply.status,
                    body: reply.body,
                });
            }
            let json: Vec<Value> = results
                .iter()
                .map(|r| json!({ "file": r.file, "status": r.status, "body": r.body }))
                .collect();
            client.print(&Value::Array(json), |_| render::apply_results(&results));
            Ok(if results.iter().all(Applied::succeeded) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TemplateCommand::List { namespace } => {
            let query: Vec<(&str, String)> =
                namespace.map(|ns| ("namespace", ns)).into_iter().collect();
            let body = api.get(&["v1", "templates"], &query).await?;
            client.print(&body, render::template_table);
            Ok(ExitCode::SUCCESS)
        }
        TemplateCommand::Show { template } => {
            let reference = TemplateRef::parse(&template)?;
            let Some(version) = reference.version else {
                return Err(Error::Usage(format!(
                    "{template:?}: name a version, as in {}/{}@1",
                    reference.namespace, reference.name
                )));
            };
            let version = version.to_string();
            let body = api
                .get(
                    &[
                        "v1",
                        "templates",
                        &reference.namespace,
                        &reference.name,
                        &version,
                    ],
                    &[],
                )
                .await?;
            client.print(&body, render::template_view);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `NAMESPACE/NAME[@VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TemplateRef {
    namespace: String,
    name: String,
    version: Option<i32>,
}

impl TemplateRef {
    fn parse(raw: &str) -> Result<TemplateRef, Error> {
        let usage = || {
            Error::Usage(format!(
                "{raw:?} is not a template reference; write NAMESPACE/NAME or NAMESPACE/NAME@VERSION"
            ))
        };
        let (path, version) = match raw.split_once('@') {
            Some((path, v)) => (path, Some(v.parse::<i32>().map_err(|_| usage())?)),
            None => (raw, None),
        };
        let (namespace, name) = path.split_once('/').ok_or_else(usage)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(usage());
        }
        Ok(TemplateRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version,
        })
    }
}

/// `weft task …`
pub async fn task(args: TaskArgs) -> ExitCode {
    finish(run_task(args).await)
}

async fn run_task(args: TaskArgs) -> Result<ExitCode, Error> {
    let client = Client::new(&args.client)?;
    let api = &client.api;
    match args.command {
        TaskCommand::Create {
            template,
            input,
            idempotency_key,
            priority,
            wait,
        } => {
            let reference = TemplateRef::parse(&template)?;
            let mut body = Map::new();
            body.insert("namespace".into(), reference.namespace.into());
            body.insert("name".into(), reference.name.into());
            if let Some(version) = reference.version {
                body.insert("version".into(), version.into());
            }
            body.insert("input".into(), api::json_argument("--input", &input)?);
            if let Some(key) = idempotency_key {
                body.insert("idempotency_key".into(), key.into());
            }
            if let Some(priority) = priority {
                body.insert("priority".into(), priority.into());
            }
            let reply = api
                .post(&["v1", "tasks"], Body::Json(Value::Object(body)))
                .await?;
            let created = if reply.status == 201 {
                "created"
            } else {
                "exists already (same idempotency key)"
            };
            if wait {
                return watch(&client, reply.body, created).await;
            }
            client.print(&reply.body, |task| {
                format!(
                    "task {} {created}\n\n{}",
                    task["id"].as_str().unwrap_or("-"),
                    render::task_view(task)
                )
            });
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Get { id } => {
            let body = api.get(&["v1", "tasks", &id], &[]).await?;
            client.print(&body, render::task_view);
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List {
            namespace,
            name,
            state,
            limit,
            cursor,
        } => {
            let query: Vec<(&str, String)> = [
                ("namespace", namespace),
                ("name", name),
                ("state", state),
                ("limit", limit.map(|l| l.to_string())),
                ("cursor", cursor),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let body = api.get(&["v1", "tasks"], &query).await?;
            client.print(&body, render::task_table);
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, reason } => {
            let body = match reason {
                Some(reason) => Body::Json(json!({ "reason": reason })),
                None => Body::Empty,
            };
            let reply = api.post(&["v1", "tasks", &id, "cancel"], body).await?;
            client.print(&reply.body, |task| {
                format!("task {id} cancelled\n\n{}", render::task_view(task))
            });
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Explain { id } => {
            let body = api.get(&["v1", "tasks", &id, "explain"], &[]).await?;
            client.print(&body, render::explain);
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::History { id } => {
            let body = api.get(&["v1", "tasks", &id, "history"], &[]).await?;
            client.print(&body, render::history);
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::RetryStep { id, step } => {
            let reply = api
                .post(&["v1", "tasks", &id, "steps", &step, "retry"], Body::Empty)
                .await?;
            client.print(&reply.body, |task| {
                format!("step {step} runs again\n\n{}", render::task_view(task))
            });
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::ResolveStep {
            id,
            step,
            step_output,
        } => {
            let body = match step_output {
                Some(raw) => {
                    Body::Json(json!({ "output": api::json_argument("--step-output", &raw)? }))
                }
                None => Body::Empty,
            };
            let reply = api
                .post(&["v1", "tasks", &id, "steps", &step, "resolve"], body)
                .await?;
            client.print(&reply.body, |task| {
                format!("step {step} resolved\n\n{}", render::task_view(task))
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn task_state(task: &Value) -> &str {
    task.get("state").and_then(Value::as_str).unwrap_or("")
}

fn is_final(state: &str) -> bool {
    matches!(state, "complete" | "error" | "cancelled")
}

/// `task create --wait`: reads the task every [`WATCH_INTERVAL`], printing
/// each change, until it is final; the exit status tells how it ended.
async fn watch(client: &Client, created: Value, verb: &str) -> Result<ExitCode, Error> {
    let id = created
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let human = client.output == OutputFormat::Table;
    let started = Instant::now();
    if human {
        emit(&format!(
            "task {id} {verb}; watching it (Ctrl-C stops watching, not the task)\n"
        ));
        emit_lines(&render::changes(None, &created, started.elapsed()));
    }
    let mut last = created;
    let mut unavailable_since: Option<Instant> = None;
    while !is_final(task_state(&last)) {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let next = match client.api.get(&["v1", "tasks", &id], &[]).await {
            Ok(next) => next,
            // An orchestrator restarting (a deploy) is not the task's fate:
            // keep watching for a while before giving up.
            Err(e) if is_transient(&e) => {
                let since = *unavailable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WATCH_OUTAGE {
                    return Err(e);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        unavailable_since = None;
        if human {
            emit_lines(&render::changes(Some(&last), &next, started.elapsed()));
        }
        last = next;
    }
    let state = task_state(&last).to_owned();
    if human {
        emit(&format!(
            "\n{}\ntask {id} {state} after {:.3}s\n",
            render::outputs(&last),
            started.elapsed().as_secs_f64()
        ));
    } else {
        emit(&pretty(&last));
    }
    Ok(match state.as_str() {
        "complete" => ExitCode::SUCCESS,
        "cancelled" => ExitCode::from(EXIT_CANCELLED),
        _ => ExitCode::FAILURE,
    })
}

/// Failures that a later request may not meet.
fn is_transient(error: &Error) -> bool {
    match error {
        Error::Unreachable { .. } => true,
        Error::Problem { status, .. } => matches!(status, 502..=504),
        _ => false,
    }
}

fn emit_lines(lines: &[String]) {
    for line in lines {
        emit(&format!("{line}\n"));
    }
}

/// `weft queue …`
pub async fn queue(args: QueueArgs) -> ExitCode {
    finish(run_queue(args).await)
}

async fn run_queue(args: QueueArgs) -> Result<ExitCode, Error> {
    let client = Client::new(&args.client)?;
    match args.command {
        QueueCommand::Stats => {
            let body = client.api.get(&["v1", "queues"], &[]).await?;
            client.print(&body, render::queue_stats);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `weft dlq …`
pub async fn dlq(args: DlqArgs) -> ExitCode {
    finish(run_dlq(args).await)
}

async fn run_dlq(args: DlqArgs) -> Result<ExitCode, Error> {
    let client = Client::new(&args.client)?;
    match args.command {
        DlqCommand::List { limit } => {
            let query: Vec<(&str, String)> = limit
                .map(|l| ("limit", l.to_string()))
                .into_iter()
                .collect();
            let body = client.api.get(&["v1", "dlq"], &query).await?;
            client.print(&body, render::dead_letters);
        }
        DlqCommand::Replay { id } => {
            let reply = client
                .api
                .post(&["v1", "dlq", &id, "replay"], Body::Empty)
                .await?;
            client.print(&reply.body, render::replayed);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_command_parses() {
        use crate::config::{Cli, Command};
        use clap::Parser;
        <Cli as clap::CommandFactory>::command().debug_assert();
        // Parsing every command with the global flags also catches a
        // subcommand flag whose name clashes with one of them, which clap
        // only reports (by panicking) when the values are read.
        let id = "0190f7c4-6c1e-7a52-9d1e-3f0c2b9a4e11";
        let lines: &[&[&str]] = &[
            &["template", "apply", "a.yaml", "b.json"],
            &["template", "list", "--namespace", "demo"],
            &["template", "show", "demo/diamond@1"],
            &[
                "task",
                "create",
                "demo/diamond",
                "--input",
                "{}",
                "--idempotency-key",
                "k",
                "--priority",
                "3",
                "--wait",
            ],
            &["task", "get", id],
            &[
                "task",
                "list",
                "--namespace",
                "demo",
                "--name",
                "diamond",
                "--state",
                "error",
                "--limit",
                "5",
                "--cursor",
                "c",
            ],
            &["task", "cancel", id, "--reason", "duplicate"],
            &["task", "explain", id],
            &["task", "history", id],
            &["task", "retry-step", id, "charge"],
            &["task", "resolve-step", id, "charge", "--step-output", "{}"],
            &["queue", "stats"],
            &["dlq", "list", "--limit", "3"],
            &["dlq", "replay", "weft_dlq_demo:1"],
        ];
        for line in lines {
            let argv = [
                &["weft"],
                *line,
                &[
                    "--output",
                    "json",
                    "--api-url",
                    "http://h:1",
                    "--token",
                    "t",
                ],
            ]
            .concat();
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let client = match cli.command {
                Command::Template(a) => a.client,
                Command::Task(a) => a.client,
                Command::Queue(a) => a.client,
                Command::Dlq(a) => a.client,
                other => panic!("{argv:?} parsed as {other:?}"),
            };
            assert_eq!(client.output, OutputFormat::Json, "{argv:?}");
            assert_eq!(client.api_url.as_deref(), Some("http://h:1"), "{argv:?}");
            assert_eq!(client.token.as_deref(), Some("t"), "{argv:?}");
        }
    }

    #[test]
    fn template_references() {
        let check = |raw: &str, expected: Option<(&str, &str, Option<i32>)>| {
            let parsed = TemplateRef::parse(raw).ok();
            let expected = expected.map(|(ns, name, version)| TemplateRef {
                namespace: ns.into(),
                name: name.into(),
                version,
            });
            assert_eq!(parsed, expected, "{raw}");
        };
        check("demo/diamond", Some(("demo", "diamond", None)));
        check("demo/diamond@3", Some(("demo", "diamond", Some(3))));
        check("demo", None);
        check("demo/", None);
        check("/diamond", None);
        check("demo/diamond@", None);
        check("demo/diamond@v1", None);
        check("a/b/c", None);
    }

    #[test]
    fn watching_survives_only_an_outage() {
        let problem = |status| Error::Problem {
            status,
            body: Value::Null,
        };
        let unreachable = Error::Unreachable {
            url: "http://h/".into(),
            reason: "refused".into(),
        };
        assert!(is_transient(&unreachable));
        assert!(is_transient(&problem(503)) && is_transient(&problem(502)));
        assert!(!is_transient(&problem(404)) && !is_transient(&problem(500)));
        assert!(!is_transient(&Error::Usage("x".into())));
    }

    #[test]
    fn unreachable_names_the_url_and_the_way_out() {
        let error = Error::Unreachable {
            url: "http://127.0.0.1:8080/".into(),
            reason: "Connection refused (os error 111)".into(),
        };
        assert_eq!(
            report(&error),
            "error: cannot reach the Weft API at http://127.0.0.1:8080/: Connection refused (os error 111)\n  \
             is it running? `weft dev` serves one on http://127.0.0.1:8080; \
             otherwise point --api-url (or WEFT_API_URL) at your orchestrator\n"
        );
    }
}
