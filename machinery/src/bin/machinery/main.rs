//! `machinery`: send tasks, read their states and trees, inspect queues and dead letters, list
//! the live workers, revoke and purge, from the command line.
//!
//! It reads the same configuration as a worker: Go's environment variables, or Go's YAML file
//! with `--config FILE` (the environment applies over it). Every command prints a human table,
//! or JSON with `--json`. An error is one line on stderr and a non-zero exit; passwords never
//! appear in any output.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod args;
mod output;

use machinery::admin::{Admin, Page, Progress, Selection, TreeNode};
use machinery::wire::{GoTime, Signature, State, TaskState};
use machinery::{Config, Error, ErrorKind};
use output::Out;

/// The machinery command line.
#[derive(Debug, Parser)]
#[command(
    name = "machinery",
    version,
    about = "Operate a machinery (Go Machinery) deployment"
)]
struct Cli {
    /// Go's YAML config file (the environment applies over it); default: the environment only.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Send a task by name; ARG is TYPE:VALUE (Go's type names: int64:3, string:hi,
    /// []string:["a","b"]) or a JSON object {"Type":..,"Value":..}.
    Send(SendArgs),
    /// The stored state of a task.
    Status {
        /// The task's UUID.
        uuid: String,
    },
    /// The results of a task.
    Result {
        /// The task's UUID.
        uuid: String,
        /// Wait until the task finishes.
        #[arg(long)]
        wait: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// The chain, group or chord of a task, as a tree with each member's state.
    Inspect {
        /// A task's UUID.
        uuid: String,
    },
    /// Depth, consumers and dead letters of each machinery queue.
    Queues {
        /// Report this queue too (repeatable).
        #[arg(long = "queue", value_name = "Q")]
        queues: Vec<String>,
    },
    /// Dead-lettered messages.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The live workers.
    Workers,
    /// The recent tasks in one state, newest first.
    Recent {
        /// STARTED, RETRY, SUCCESS or FAILURE.
        state: String,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Tasks/s and failures/s over the last minutes.
    Throughput {
        /// The window, in seconds (at most 3600).
        #[arg(long, default_value_t = 900)]
        window: u64,
    },
    /// Revoke a task: it never starts, or is cancelled while it runs.
    Revoke {
        /// The task's UUID.
        uuid: String,
    },
    /// Delete every message waiting in a queue.
    Purge {
        /// The queue.
        queue: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Serve the web dashboard until Ctrl-C. Binds to loopback by default; a non-loopback
    /// address needs the access token in the environment variable DASHBOARD_TOKEN.
    #[cfg(feature = "dashboard")]
    Dashboard {
        /// The address to listen on.
        #[arg(long, default_value = machinery::dashboard::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Args)]
struct SendArgs {
    /// The task's registered name.
    name: String,
    /// Its arguments.
    args: Vec<String>,
    /// Wait for the result and print it.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// The routing key (queue) to send to; default: the configured default queue.
    #[arg(long)]
    queue: Option<String>,
    /// Run it at this time (RFC 3339, such as 2030-01-01T12:00:00Z).
    #[arg(long, conflicts_with = "countdown")]
    eta: Option<String>,
    /// Run it this many seconds from now.
    #[arg(long)]
    countdown: Option<f64>,
}

#[derive(Debug, Args, Clone, Copy)]
struct PageArgs {
    /// Items to skip.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Items to show at most.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

impl PageArgs {
    fn page(self) -> Page {
        Page {
            offset: self.offset,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List the dead letters of a queue, oldest first.
    List {
        /// The queue (default: the configured default queue).
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one dead letter.
    Show {
        /// The queue (default: the configured default queue).
        #[arg(long)]
        queue: Option<String>,
        /// Its id: the task UUID, or sha1:<hex> for a body that is no task.
        #[arg(long)]
        id: String,
    },
    /// Publish dead letters again, with a fresh attempt count.
    Requeue {
        /// The queue (default: the configured default queue).
        #[arg(long)]
        queue: Option<String>,
        /// The ids to requeue (repeatable).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        id: Vec<String>,
        /// Requeue them all.
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter of a queue.
    Purge {
        /// The queue (default: the configured default queue).
        #[arg(long)]
        queue: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Out::new(cli.json);
    let outcome = runtime.block_on(run(cli, &mut out));
    // Background tasks (connections) end with the runtime, without waiting.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration: `--config FILE` or the environment. Without
/// `RECONNECT_TIMEOUT_MS`, a command gives up on an unreachable broker after 10 s.
fn load_config(cli: &Cli, out: &mut Out) -> Result<Config, Error> {
    let mut config = match &cli.config {
        Some(path) => Config::from_yaml_file(path)?,
        None => Config::from_env()?,
    };
    out.secrets_of(&config);
    if std::env::var_os("RECONNECT_TIMEOUT_MS").is_none() {
        config.reconnect_timeout = Duration::from_secs(10);
    }
    Ok(config)
}

async fn run(cli: Cli, out: &mut Out) -> Result<(), Error> {
    let config = load_config(&cli, out)?;
    let admin = Admin::from_config(&config).await?;
    match cli.command {
        Command::Send(send) => send_task(&admin, send, out).await,
        Command::Status { uuid } => {
            let info = admin.task(&uuid).await?;
            let Some(state) = &info.state else {
                return Err(not_found(&uuid));
            };
            out.status(&info, state);
            Ok(())
        }
        Command::Result {
            uuid,
            wait,
            timeout,
        } => {
            let state = if wait {
                wait_final(&admin, &uuid, timeout).await?
            } else {
                admin
                    .task(&uuid)
                    .await?
                    .state
                    .ok_or_else(|| not_found(&uuid))?
            };
            out.result(&state)
        }
        Command::Inspect { uuid } => {
            let tree: TreeNode = admin.tree(&uuid).await?;
            out.tree(&tree);
            Ok(())
        }
        Command::Queues { queues } => {
            let queues = admin.queues_with(&queues).await?;
            out.queues(&queues);
            Ok(())
        }
        Command::Dlq { command } => dlq(&admin, command, out).await,
        Command::Workers => {
            let workers = admin.workers().await?;
            out.workers(&workers);
            Ok(())
        }
        Command::Recent { state, page } => {
            let state = State::parse(&state.to_ascii_uppercase()).ok_or_else(|| {
                usage(format!(
                    "unknown state `{state}` (expected STARTED, RETRY, SUCCESS or FAILURE)"
                ))
            })?;
            let recent = admin.recent(state, page.page()).await?;
            out.recent(&recent);
            Ok(())
        }
        Command::Throughput { window } => {
            let buckets = admin.throughput(Duration::from_secs(window)).await?;
            out.throughput(&buckets);
            Ok(())
        }
        Command::Revoke { uuid } => {
            let revoked = admin.revoke(&uuid).await?;
            out.revoked(&uuid, revoked);
            Ok(())
        }
        Command::Purge { queue, yes } => {
            let depth = admin.queue(&queue).await?.depth;
            confirm(
                yes,
                &format!("purge {depth} messages from queue `{queue}`?"),
            )?;
            let purged = admin.purge(&queue).await?;
            out.purged(&queue, purged);
            Ok(())
        }
        #[cfg(feature = "dashboard")]
        Command::Dashboard { listen } => serve_dashboard(admin, listen).await,
    }
}

/// Serves the dashboard until Ctrl-C or SIGTERM. The token is read from the environment only,
/// never from the command line (which other users of the machine can read).
#[cfg(feature = "dashboard")]
async fn serve_dashboard(admin: Admin, listen: std::net::SocketAddr) -> Result<(), Error> {
    let token = std::env::var("DASHBOARD_TOKEN").ok();
    let dashboard = machinery::dashboard::Dashboard::new(admin)
        .listen(listen)
        .token(token)
        .spawn()
        .await?;
    println!("machinery dashboard on http://{}/", dashboard.local_addr());
    let _ = std::io::stdout().flush();
    stop_signal().await;
    dashboard.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix.
#[cfg(feature = "dashboard")]
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn send_task(admin: &Admin, send: SendArgs, out: &mut Out) -> Result<(), Error> {
    let parsed = send
        .args
        .iter()
        .enumerate()
        .map(|(i, arg)| args::parse_arg(i, arg))
        .collect::<Result<Vec<_>, Error>>()?;
    let eta = match (&send.eta, send.countdown) {
        (Some(eta), _) => Some(
            chrono::DateTime::parse_from_rfc3339(eta)
                .map_err(|e| usage(format!("--eta `{eta}` is not an RFC 3339 time: {e}")))?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(secs)) => {
            let delay = Duration::try_from_secs_f64(secs)
                .map_err(|_| usage("--countdown must be a positive number of seconds"))?;
            let delay =
                chrono::Duration::from_std(delay).map_err(|_| usage("--countdown is too large"))?;
            Some(chrono::Utc::now() + delay)
        }
        (None, None) => None,
    };
    let mut signature = Signature::new(send.name.clone());
    signature.uuid = format!("task_{}", uuid::Uuid::new_v4());
    signature.args = parsed;
    if let Some(queue) = send.queue {
        signature.routing_key = queue;
    }
    signature.eta = eta.map(GoTime::from);
    let uuid = signature.uuid.clone();
    // Checks the arguments as `send_by_name` does, then sends the signature as built.
    for (i, arg) in signature.args.iter().enumerate() {
        machinery::value::check_arg(arg).map_err(|e| {
            usage(format!(
                "argument {} (`{}`): {}",
                i + 1,
                send.args[i],
                e.message()
            ))
        })?;
    }
    admin.server().send_wire(signature).await?;
    if !send.wait {
        out.sent(&uuid);
        return Ok(());
    }
    let state = wait_final(admin, &uuid, send.timeout).await?;
    out.result(&state)
}

async fn wait_final(admin: &Admin, uuid: &str, timeout: f64) -> Result<TaskState, Error> {
    let backend = admin.server().backend().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "waiting for a result needs a result backend (RESULT_BACKEND)",
        )
    })?;
    let timeout = Duration::try_from_secs_f64(timeout)
        .map_err(|_| usage("--timeout must be a positive number of seconds"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    backend.wait_final(uuid, Some(deadline)).await
}

fn not_found(uuid: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("no state is stored for task {uuid} (never sent, or expired)"),
    )
}

async fn dlq(admin: &Admin, command: DlqCommand, out: &mut Out) -> Result<(), Error> {
    match command {
        DlqCommand::List { queue, page } => {
            let letters = admin.dead_letters(queue.as_deref(), page.page()).await?;
            out.dead_letters(&letters);
            Ok(())
        }
        DlqCommand::Show { queue, id } => {
            let letter = admin
                .dead_letter(queue.as_deref(), &id)
                .await?
                .ok_or_else(|| {
                    Error::new(ErrorKind::Broker, format!("no dead letter with id {id}"))
                })?;
            out.dead_letter(&letter);
            Ok(())
        }
        DlqCommand::Requeue { queue, id, all } => {
            let which = if all {
                Selection::All
            } else {
                Selection::Ids(id)
            };
            let bar = progress_bar();
            let mut on_progress = |p: Progress| {
                if let Some(bar) = &bar {
                    if let Some(total) = p.total {
                        bar.set_length(total);
                    }
                    bar.set_position(p.done);
                }
            };
            let report = admin
                .requeue(queue.as_deref(), &which, &mut on_progress)
                .await;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let report = report?;
            out.requeued(&report);
            if report.not_found.is_empty() {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Broker,
                    format!(
                        "not in the dead-letter queue: {}",
                        report.not_found.join(", ")
                    ),
                ))
            }
        }
        DlqCommand::Purge { queue, yes } => {
            let name = queue
                .clone()
                .unwrap_or_else(|| admin.config().default_queue.clone());
            confirm(yes, &format!("delete every dead letter of queue `{name}`?"))?;
            let purged = admin.purge_dead_letters(queue.as_deref()).await?;
            out.purged(&format!("{name}.dead_letter"), purged);
            Ok(())
        }
    }
}

/// A progress bar on stderr when it is a terminal.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requeued ({eta} left)")
    {
        bar.set_style(style);
    }
    Some(bar)
}

/// Asks on stderr (when stdin is a terminal) and reads the answer from stdin, unless `yes`;
/// refuses without a `y`.
fn confirm(yes: bool, question: &str) -> Result<(), Error> {
    if yes {
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    let mut stderr = std::io::stderr();
    if interactive {
        let _ = write!(stderr, "{question} [y/N] ");
        let _ = stderr.flush();
    }
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        return Ok(());
    }
    if interactive && !answer.ends_with('\n') {
        let _ = writeln!(stderr);
    }
    Err(usage(
        "not confirmed; nothing was deleted (pass --yes to skip the question)",
    ))
}

/// An error in what the user asked (a bad argument, an unconfirmed purge).
pub(crate) fn usage(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}
