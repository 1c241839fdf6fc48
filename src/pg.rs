//! The private PostgreSQL cluster for `weft dev`: the same `scripts/pg` the
//! tests use, embedded in the binary so `weft dev` works from any directory.

use std::process::Stdio;

use anyhow::{Context, bail};

static SCRIPT: &str = include_str!("../scripts/pg");

/// Runs `scripts/pg <args>` and returns its stdout (the DATABASE_URL line for
/// `start`). Its human messages pass through to our stderr.
pub fn run(args: &[&str], port: u16) -> anyhow::Result<String> {
    let path = std::env::temp_dir().join(format!("weft-pg-{}.sh", std::process::id()));
    std::fs::write(&path, SCRIPT).context("writing the embedded scripts/pg")?;
    let output = std::process::Command::new("bash")
        .arg(&path)
        .args(args)
        .env("WEFT_PG_PORT", port.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running bash for scripts/pg");
    let _ = std::fs::remove_file(&path);
    let output = output?;
    if !output.status.success() {
        bail!("scripts/pg {} failed ({})", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Starts (or reuses) the private cluster and returns its DATABASE_URL.
pub fn start(port: u16) -> anyhow::Result<String> {
    let out = run(&["start"], port)?;
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .map(str::to_owned)
        .context("scripts/pg start printed no DATABASE_URL")
}
