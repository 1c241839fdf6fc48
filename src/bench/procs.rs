//! The measured processes: `weft orchestrator` and `weft worker`, started
//! from the `weft` binary with the flags an operator would use, watched
//! through /proc (peak resident memory, CPU time) and stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::server::with_application_name;

/// How to start processes.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub bin: PathBuf,
    pub concurrency: usize,
    pub orchestrator_args: Vec<String>,
    pub worker_args: Vec<String>,
    pub log: String,
}

/// What a process used, read just before it was stopped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
}

/// A running `weft` process; killed if dropped without [`Proc::stop`].
pub struct Proc {
    pub role: &'static str,
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
}

impl Launcher {
    pub async fn orchestrator(&self, url: &str, name: &str) -> anyhow::Result<Proc> {
        let addr = free_addr()?;
        let mut args = vec![
            "orchestrator".to_owned(),
            "--http-addr".to_owned(),
            addr.to_string(),
            "--migrate".to_owned(),
            "false".to_owned(),
            "--poll-interval".to_owned(),
            "5s".to_owned(),
            // The API listens on 127.0.0.1 only, for the benchmark's client.
            "--auth".to_owned(),
            "off".to_owned(),
        ];
        args.extend(self.orchestrator_args.iter().cloned());
        self.spawn("orchestrator", addr, &args, url, name).await
    }

    pub async fn worker(&self, url: &str, name: &str) -> anyhow::Result<Proc> {
        let addr = free_addr()?;
        let mut args = vec![
            "worker".to_owned(),
            "--namespace".to_owned(),
            super::workloads::NAMESPACE.to_owned(),
            "--http-addr".to_owned(),
            addr.to_string(),
            "--concurrency".to_owned(),
            self.concurrency.to_string(),
            "--poll-interval".to_owned(),
            "5s".to_owned(),
        ];
        args.extend(self.worker_args.iter().cloned());
        self.spawn("worker", addr, &args, url, name).await
    }

    async fn spawn(
        &self,
        role: &'static str,
        addr: SocketAddr,
        args: &[String],
        url: &str,
        name: &str,
    ) -> anyhow::Result<Proc> {
        let child = Command::new(&self.bin)
            .args(args)
            .env("DATABASE_URL", with_application_name(url, name))
            .env("RUST_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let pid = child.id().context("the process exited at once")?;
        let mut proc = Proc {
            role,
            addr,
            pid,
            child,
        };
        proc.wait_ready().await?;
        Ok(proc)
    }
}

impl Proc {
    /// Waits until `/health/ready` answers 200.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("http://{}/health/ready", self.addr);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited during startup ({status})", self.role);
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{} not ready after 60 s", self.role);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn usage(&self) -> Usage {
        Usage {
            peak_rss_kib: peak_rss_kib(self.pid).unwrap_or(0),
        }
    }

    /// SIGTERM, then waits for a graceful exit (SIGKILL after 30 s).
    /// Returns the usage read just before the signal.
    pub async fn stop(mut self) -> anyhow::Result<Usage> {
        let usage = self.usage();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                eprintln!("bench: {} did not stop in 30 s; killing it", self.role);
                self.child.kill().await?;
            }
        }
        Ok(usage)
    }
}

/// Stops every process, returning the usage of each with its role.
pub async fn stop_all(procs: Vec<Proc>) -> anyhow::Result<Vec<(&'static str, Usage)>> {
    let mut out = Vec::with_capacity(procs.len());
    for p in procs {
        let role = p.role;
        out.push((role, p.stop().await?));
    }
    Ok(out)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// VmHWM of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after "pid (comm) ".
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux in practice).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(peak_rss_kib(pid).is_some_and(|k| k > 0));
        assert!(cpu_ticks(pid).is_some());
        assert!(ticks_per_second() > 0.0);
    }
}
