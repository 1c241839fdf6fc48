//! `builtin.exec` `{command: [argv...]}`: runs a command with the step as
//! JSON on stdin; stdout is the output (JSON, or `{stdout}` when it is not).
//! A non-zero exit is retryable and carries the end of stderr. The child is
//! killed when the step is cancelled or times out (the future is dropped).
//! Registered only when the worker allows it: it runs arbitrary commands.

use std::io::ErrorKind;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Config, kind, tail};
use crate::handler::{StepContext, StepError};

/// How much of stderr goes into the failure message.
const STDERR_TAIL: usize = 2048;

pub async fn exec(ctx: StepContext) -> Result<Value, StepError> {
    let argv = command(&ctx)?;
    let stdin = serde_json::to_vec(&step_json(&ctx))
        .map_err(|e| StepError::permanent(format!("encoding the step: {e}")))?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            let message = format!("config.command: cannot run {:?}: {e}", argv[0]);
            // A missing or forbidden program will not appear on a retry.
            match e.kind() {
                ErrorKind::NotFound | ErrorKind::PermissionDenied => StepError::permanent(message),
                _ => StepError::retryable(message),
            }
        })?;
    let mut pipe = child.stdin.take();
    // Write stdin while the child runs: a child that writes before it reads
    // would otherwise fill its stdout pipe and deadlock with us.
    let feed = async move {
        if let Some(pipe) = pipe.as_mut() {
            // A child that exits without reading stdin is not our failure.
            let _ = pipe.write_all(&stdin).await;
        }
        drop(pipe);
    };
    let run = async { tokio::join!(feed, child.wait_with_output()).1 };
    let output = tokio::select! {
        output = run => output.map_err(|e| StepError::retryable(format!("waiting for {:?}: {e}", argv[0])))?,
        // Dropping `run` drops the child, which kills it.
        () = ctx.cancellation.cancelled() => return Err(StepError::retryable(format!("{:?} cancelled", argv[0]))),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(StepError::retryable(format!(
            "{:?} {}: {}",
            argv[0],
            output.status,
            tail(&stderr, STDERR_TAIL)
        )));
    }
    Ok(serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| json!({ "stdout": String::from_utf8_lossy(&output.stdout) })))
}

fn command(ctx: &StepContext) -> Result<Vec<String>, StepError> {
    let config = Config::new(&ctx.config, &["command"])?;
    let expected = "a non-empty array of strings";
    let argv = config.required(
        config.typed("command", expected, Value::as_array)?,
        "command",
        expected,
    )?;
    let argv: Vec<String> = argv
        .iter()
        .enumerate()
        .map(|(i, arg)| {
            arg.as_str().map(str::to_owned).ok_or_else(|| {
                StepError::permanent(format!(
                    "config.command[{i}]: expected a string, found {}",
                    kind(arg)
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if argv.is_empty() {
        return Err(StepError::permanent(format!(
            "config.command: expected {expected}, found []"
        )));
    }
    Ok(argv)
}

/// The step as the command sees it: the context without its token, and the
/// deadline as the milliseconds left.
fn step_json(ctx: &StepContext) -> Value {
    let remaining = ctx
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    json!({
        "task_id": ctx.task_id,
        "step_id": ctx.step_id,
        "step": ctx.step,
        "namespace": ctx.namespace,
        "handler": ctx.handler,
        "attempt": ctx.attempt,
        "config": ctx.config,
        "input": ctx.input,
        "dependencies": ctx.dependencies,
        "remaining_ms": u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::builtin::tests::ctx;

    fn step(command: &[&str]) -> StepContext {
        ctx("builtin.exec", 1, json!({ "command": command }))
    }

    #[tokio::test]
    async fn the_step_goes_in_on_stdin_and_json_comes_out() {
        let ctx = step(&["cat"]);
        let task_id = ctx.task_id;
        let out = exec(ctx).await.expect("cat succeeds");
        assert_eq!(out["task_id"], json!(task_id));
        assert_eq!(out["input"], json!({"order": 7}));
        assert_eq!(out["dependencies"]["validate"], json!({"ok": true}));
        assert_eq!(out["config"]["command"], json!(["cat"]));
    }

    #[tokio::test]
    async fn text_output_is_wrapped() {
        let out = exec(step(&["sh", "-c", "echo hello"])).await;
        assert_eq!(out, Ok(json!({"stdout": "hello\n"})));
    }

    #[tokio::test]
    async fn failure_is_retryable_with_the_end_of_stderr() {
        let out = exec(step(&[
            "sh",
            "-c",
            "echo starting >&2; echo it broke >&2; exit 3",
        ]))
        .await;
        assert_eq!(
            out,
            Err(StepError::retryable(
                "\"sh\" exit status: 3: starting\nit broke"
            ))
        );
    }

    #[tokio::test]
    async fn cancellation_kills_the_command() {
        let ctx = step(&["sleep", "30"]);
        let token = ctx.cancellation.clone();
        let running = tokio::spawn(exec(ctx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        token.cancel();
        let out = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("stops promptly")
            .expect("no panic");
        assert_eq!(out, Err(StepError::retryable("\"sleep\" cancelled")));
    }

    #[tokio::test]
    async fn bad_commands_are_permanent() {
        let check = |config: Value, expected: &'static str| async move {
            assert_eq!(
                exec(ctx("builtin.exec", 1, config)).await,
                Err(StepError::permanent(expected))
            );
        };
        check(
            json!({}),
            "config.command: missing, expected a non-empty array of strings",
        )
        .await;
        check(
            json!({"command": "ls -l"}),
            "config.command: expected a non-empty array of strings, found \"ls -l\"",
        )
        .await;
        check(
            json!({"command": []}),
            "config.command: expected a non-empty array of strings, found []",
        )
        .await;
        check(
            json!({"command": ["ls", 1]}),
            "config.command[1]: expected a string, found 1",
        )
        .await;
        check(
            json!({"command": ["/nonexistent/weft-test"]}),
            "config.command: cannot run \"/nonexistent/weft-test\": No such file or directory (os error 2)",
        )
        .await;
    }
}
