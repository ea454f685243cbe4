//! Starting a data-parallel run: `harma train --nproc N` spawns one worker process per GPU
//! (or CPU rank) on this machine, several machines join with `--nnodes M --node-rank R
//! --master ADDR:PORT`, and a worker started by another launcher (torchrun-style scripts,
//! SLURM) finds its place in `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and
//! `MASTER_PORT`. The launcher watches its workers: when one fails it stops the others and
//! names the rank; Ctrl-C asks them all to stop after the step (rank 0 saves once).

use std::ffi::OsString;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The launcher's flags (`harma train`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchArgs {
    /// Worker processes on this machine (`--nproc`).
    pub nproc: Option<usize>,
    /// Machines in the run (`--nnodes`).
    pub nnodes: usize,
    /// This machine's index among them (`--node-rank`).
    pub node_rank: usize,
    /// Rank 0's address, `host:port` (`--master`); on one machine a free local port.
    pub master: Option<String>,
    /// The job's secret as the launcher's environment gives it ([`SECRET_VAR`]); without
    /// one, a run on one machine makes its own.
    pub secret: Option<String>,
}

/// The flags [`LaunchArgs`] reads, and whether each takes a value.
pub const FLAGS: [(&str, bool); 4] = [
    ("--nproc", true),
    ("--nnodes", true),
    ("--node-rank", true),
    ("--master", true),
];

/// Where this process stands in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub rank: usize,
    pub world: usize,
    /// Its index among the ranks of its machine (its GPU).
    pub local_rank: usize,
    /// Rank 0's `host:port`.
    pub master: String,
    /// Started by `harma train --nproc`: the launcher's stop requests come on stdin.
    pub launched: bool,
    /// The job's secret (`HARMA_DIST_SECRET`): a rank proves it holds it before rank 0 counts
    /// it. `--nproc`'s launcher makes one for its workers.
    pub secret: String,
    /// How long a rank waits for another in any exchange once they met
    /// (`HARMA_DIST_TIMEOUT`, seconds; default 1800): longer than a step, or than rank 0's
    /// evaluation while the others wait.
    pub timeout: std::time::Duration,
}

/// The variable that carries a data-parallel job's secret to every rank.
pub const SECRET_VAR: &str = "HARMA_DIST_SECRET";

impl Role {
    /// The role the environment gives (`WORLD_SIZE` > 1), or `None` for a single process;
    /// `var` reads the environment (the binary passes `std::env::var`, tests a map).
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Role>> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.parse()
                        .with_context(|| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let Some(world) = num("WORLD_SIZE")? else {
            return Ok(None);
        };
        let launched = get("HARMA_LAUNCHED").is_some();
        // a world of one is a single process, unless our launcher made it (`--nproc 1`: the
        // collective is set up and checked all the same, as on a machine with one GPU)
        if world == 0 || (world == 1 && !launched) {
            return Ok(None);
        }
        let rank = num("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let addr = get("MASTER_ADDR").context("WORLD_SIZE is set but MASTER_ADDR is not")?;
        let port = num("MASTER_PORT")?.context("WORLD_SIZE is set but MASTER_PORT is not")?;
        let secret = get(SECRET_VAR).with_context(|| {
            format!(
                "rank {rank}: {SECRET_VAR} is not set: every rank of a job must be given the same \
                 secret (`harma train --nproc` makes one for its workers; with another launcher, \
                 or across machines, set it to the same value for every rank)"
            )
        })?;
        let timeout =
            std::time::Duration::from_secs(num("HARMA_DIST_TIMEOUT")?.unwrap_or(1800) as u64);
        Ok(Some(Role {
            rank,
            world,
            local_rank,
            master: format!("{addr}:{port}"),
            launched,
            secret,
            timeout,
        }))
    }
}

/// `args` without the launcher's flags (and their values): the workers' command line.
pub fn worker_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let s = a.to_string_lossy();
        match FLAGS
            .iter()
            .find(|(f, _)| s == *f || s.starts_with(&format!("{f}=")))
        {
            Some((f, takes_value)) => skip_value = *takes_value && s == *f,
            None => out.push(a.clone()),
        }
    }
    out
}

/// A free port on this machine for rank 0 (a single-machine run).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The workers of this machine and how the launcher speaks to them.
struct Workers {
    children: Vec<(usize, Child)>,
}

/// Start this machine's workers of `harma train` with `worker_args`, watch them, and return
/// when all have finished: an error names the first rank that failed, after the others have
/// been stopped. Ctrl-C asks every worker to stop after its current step (a second Ctrl-C
/// kills them).
pub fn launch(args: &LaunchArgs, worker_args: &[OsString]) -> Result<()> {
    let nproc = args.nproc.context("--nproc")?;
    if nproc == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!(
            "--nproc {nproc} --nnodes {} --node-rank {}: need at least one process and node, \
             and a node rank below the node count",
            args.nnodes,
            args.node_rank
        );
    }
    let master = match (&args.master, args.nnodes) {
        (Some(m), _) => m.clone(),
        (None, 1) => format!("127.0.0.1:{}", free_port()?),
        (None, _) => bail!(
            "--nnodes {}: give --master HOST:PORT, the address of node 0",
            args.nnodes
        ),
    };
    let (host, port) = master
        .rsplit_once(':')
        .with_context(|| format!("--master {master}: expected HOST:PORT"))?;
    let world = nproc * args.nnodes;
    // the job's secret: ours to make on one machine; on several, the user's, the same on each
    let secret = match args.secret.clone().filter(|v| !v.is_empty()) {
        Some(s) => s,
        None if args.nnodes == 1 => super::tcp::new_secret(),
        None => bail!(
            "--nnodes {}: set {SECRET_VAR} to the same secret on every machine (for example \
             `export {SECRET_VAR}=$(openssl rand -hex 16)` once, copied to each): rank 0 admits \
             only ranks that hold it",
            args.nnodes
        ),
    };
    let exe = std::env::current_exe().context("cannot find the harma binary")?;
    let mut workers = Workers { children: vec![] };
    for local in 0..nproc {
        let rank = args.node_rank * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .args(worker_args)
            .env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("MASTER_ADDR", host)
            .env("MASTER_PORT", port)
            .env("HARMA_LAUNCHED", "1")
            .env(SECRET_VAR, &secret)
            .stdin(Stdio::piped());
        // its own process group: a terminal's Ctrl-C reaches the launcher, which asks once
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start rank {rank}"))?;
        workers.children.push((rank, child));
    }
    eprintln!(
        "launched ranks {}..{} of {world} (rank 0 at {master})",
        args.node_rank * nproc,
        (args.node_rank + 1) * nproc - 1
    );
    let stdins: Vec<_> = workers
        .children
        .iter_mut()
        .filter_map(|(_, c)| c.stdin.take())
        .collect();
    let stdins = Arc::new(Mutex::new(stdins));
    let interrupts = Arc::new(AtomicU32::new(0));
    {
        let (stdins, interrupts) = (stdins.clone(), interrupts.clone());
        ctrlc::set_handler(move || {
            let n = interrupts.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                eprintln!("\ninterrupt: asking every rank to stop after its step and save");
                if let Ok(mut ins) = stdins.lock() {
                    for s in ins.iter_mut() {
                        writeln!(s, "stop").ok();
                        s.flush().ok();
                    }
                }
            } else {
                eprintln!("\nsecond interrupt: stopping the ranks now");
            }
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    workers.watch(&interrupts)
}

impl Workers {
    /// Wait for every worker; when one fails (or a second Ctrl-C comes), kill the others.
    fn watch(&mut self, interrupts: &AtomicU32) -> Result<()> {
        let mut done = vec![false; self.children.len()];
        loop {
            for (i, (rank, child)) in self.children.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                if let Some(status) = child.try_wait()? {
                    done[i] = true;
                    if !status.success() {
                        let rank = *rank;
                        self.kill_all();
                        bail!(
                            "rank {rank} failed ({status}); the other ranks of this machine \
                             were stopped (the lines above say why)"
                        );
                    }
                }
            }
            if done.iter().all(|d| *d) {
                return Ok(());
            }
            if interrupts.load(Ordering::SeqCst) > 1 {
                self.kill_all();
                bail!("interrupted twice: the ranks were stopped without saving");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_all(&mut self) {
        for (_, child) in &mut self.children {
            child.kill().ok();
        }
        for (_, child) in &mut self.children {
            child.wait().ok();
        }
    }
}

impl Drop for Workers {
    /// The launcher never leaves workers behind, whatever way it ends.
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                child.kill().ok();
                child.wait().ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_flags_are_left_out_of_the_workers_command_line() {
        let args: Vec<OsString> = [
            "--lr",
            "1e-4",
            "--nproc",
            "2",
            "--master=h:1",
            "--nnodes",
            "1",
            "--out",
            "r",
            "--node-rank=0",
        ]
        .map(OsString::from)
        .to_vec();
        let w: Vec<String> = worker_args(&args)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(w, ["--lr", "1e-4", "--out", "r"]);
    }
}
