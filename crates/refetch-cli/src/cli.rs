//! The command line: subcommands, flags and their help texts (clap derive).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

// Paragraphs are single lines: clap wraps them to the terminal's width. Example lines stay
// below 80 columns.
const AFTER_HELP: &str = "\
Examples:
  refetch demo                          # all in one process, nothing to set up
  refetch validate -c refetch.toml      # keys, lines, environment variables
  refetch validate -c refetch.toml --connect  # ... reach broker, sources, sink
  refetch run -c refetch.toml           # run until SIGTERM or SIGINT
  refetch fetch -c refetch.toml --key customer:42 --key customer:43
  refetch offsets -c refetch.toml       # committed offset, end offset, lag
  refetch offsets -c refetch.toml --reset-to 2h            # the plan only
  refetch offsets -c refetch.toml --reset-to 2h --execute  # commit it
  refetch dlq list -c refetch.toml
  refetch dlq redrive -c refetch.toml --all
  refetch backfill -c refetch.toml      # load every listed entity (resumable)
  refetch reconcile -c refetch.toml     # find and repair drift
  refetch completions bash > /etc/bash_completion.d/refetch

Signals: `run` drains and commits on the first SIGTERM or SIGINT (exit 0) and reloads its configuration on SIGHUP. One-shot commands (fetch, backfill, reconcile, dlq redrive) finish what is in flight, keep their checkpoint and exit 130; the others stop at once with 130. A second signal always exits 130 at once.

Exit codes: 0 success, 1 failure, 2 invalid command line or configuration, 130 interrupted.

Configuration reference: docs/configuration.md. Operations guide: docs/operations.md.";

/// refetch: consume change notifications from Kafka, fetch each entity's current state once per
/// burst, write it durably, and commit offsets only for what is durable.
#[derive(Debug, Parser)]
#[command(name = "refetch", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline described by a configuration file until SIGTERM or SIGINT.
    #[command(after_help = "\
Serves /metrics, /healthz, /readyz, /status.json and a status page on [ops] listen (127.0.0.1:9464 by default).

Signals: the first SIGTERM or SIGINT drains and commits (exit 0); a second one exits at once (exit 130). SIGHUP re-reads the configuration file: an invalid file is logged and counted and the pipeline keeps running; the log level is applied at once; any other change drains, commits and rebuilds the pipeline in this process (no notification is lost).

Example:
  refetch run --config /etc/refetch/refetch.toml")]
    Run(ConfigArg),
    /// Check a configuration file; with --connect, also reach the broker, source and sink.
    #[command(after_help = "\
Every problem of the file is reported at once, each with the file, line and column of its key (exit 2). Warnings (weakened guarantees, old shapes) are printed; --deny-warnings turns them into errors.

With --connect each check prints one line: broker metadata and topics, the dead-letter topic (exists with partitions, from the broker's metadata), each source reachable (its [validate.health_urls] entry with GET, otherwise a HEAD of the URL template's origin), and the sink. validate changes nothing: it creates no file, table or topic.

Example:
  CRM_TOKEN=... PG_PASSWORD=... refetch validate --config crm.toml --connect")]
    Validate(ValidateArgs),
    /// Stream generated notifications through the real pipeline, all in this process.
    #[command(after_help = "\
Starts librdkafka's mock cluster (3 partitions), a demo REST source whose customers change in bursts, and a SQLite sink in a temporary folder; streams the notifications through the real Kafka consumer, coalescing engine and HTTP fetcher; prints a summary and checks that the sink equals the source for every customer that changed (exit 1 if not).

Examples:
  refetch demo
  refetch demo --notifications 100000 --entities 5000 --duplicates 4 --window 300ms --seed 7")]
    Demo(DemoArgs),
    /// Inspect and redrive the dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Refresh entities now, through the engine's single flight.
    #[command(after_help = "\
Fetches each key from its source and writes it to the sink, exactly like a notification would (versions, validators, dead letters), without touching consumer offsets. A SIGTERM or SIGINT finishes what is in flight and exits 130.

Example:
  refetch fetch --config crm.toml --key customer:42 --key customer:43")]
    Fetch(FetchArgs),
    /// Show the consumer group's committed offsets, end offsets and lag; plan or make a reset.
    #[command(after_help = "\
TIME for --reset-to: `earliest`, `latest`, an RFC 3339 timestamp, or a duration ago (`2h`). --reset-to prints the plan (committed, new and end offset per partition) and changes nothing; add --execute to commit it, which needs every refetch process of the group stopped (the broker refuses commits from outside an active group).

Examples:
  refetch offsets --config crm.toml
  refetch offsets --config crm.toml --reset-to 2h
  refetch offsets --config crm.toml --reset-to 2h --execute")]
    Offsets(OffsetsArgs),
    /// Load every entity a source lists into the sink; resumable after a crash.
    #[command(after_help = "\
Pages through each entity type's listing ([fetcher.sources.T.listing]). Complete listing items that carry a version are written directly (the sink's version guard keeps anything newer); other ids are refreshed through the engine's single flight. After the sink acknowledged a page its checkpoint is written to [backfill] state_file (default: next to the config file), so a crashed or interrupted backfill resumes where it stopped. Safe to run while `refetch run` consumes. A SIGTERM or SIGINT finishes the page in flight, keeps the checkpoint and exits 130.

Examples:
  refetch backfill --config crm.toml
  refetch backfill --config crm.toml --type customer --restart")]
    Backfill(BackfillArgs),
    /// Compare the source's listing with the sink and repair what drifted.
    #[command(after_help = "\
Lists every entity of each type with a listing, reads the versions the sink holds (PostgreSQL and SQLite sinks), and refreshes through the engine every key that is missing, stale, or held but not listed (deleted only when a fetch of that id says gone, under the gone guard). Prints the drift by kind with sample keys; drift means notifications were lost upstream. A SIGTERM or SIGINT finishes the repairs in flight and exits 130.

Examples:
  refetch reconcile --config crm.toml
  refetch reconcile --config crm.toml --type customer --dry-run")]
    Reconcile(ReconcileArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "\
Examples:
  refetch completions bash > /etc/bash_completion.d/refetch
  refetch completions zsh > \"${fpath[1]}/_refetch\"
  refetch completions fish > ~/.config/fish/completions/refetch.fish")]
    Completions(CompletionsArgs),
}

/// `refetch completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `refetch backfill`.
#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only this entity type (default: every type with a listing).
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: Option<String>,
    /// Ignore the checkpoint and start from the first page.
    #[arg(long)]
    pub restart: bool,
}

/// `refetch reconcile`.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only this entity type (default: every type with a listing).
    #[arg(long = "type", value_name = "TYPE")]
    pub entity_type: Option<String>,
    /// Report the drift without repairing it.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--config FILE`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The TOML configuration file.
    #[arg(short, long, value_name = "FILE", env = "REFETCH_CONFIG")]
    pub config: PathBuf,
}

/// `refetch validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Also reach the broker (metadata, dead-letter topic), each source and the sink.
    #[arg(long)]
    pub connect: bool,
    /// Treat warnings (weakened guarantees, old shapes) as errors: exit 2 when there are any.
    #[arg(long)]
    pub deny_warnings: bool,
}

/// `refetch fetch`.
#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// An entity to refresh, as TYPE:ID (repeatable; the id is everything after the first `:`).
    #[arg(long = "key", value_name = "TYPE:ID", required = true)]
    pub keys: Vec<String>,
}

/// `refetch offsets`.
#[derive(Debug, Clone, Args)]
pub struct OffsetsArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Plan moving the group's committed offsets to TIME (`earliest`, `latest`, RFC 3339, or `2h`
    /// ago): prints the plan and changes nothing without --execute.
    #[arg(long, value_name = "TIME")]
    pub reset_to: Option<String>,
    /// With --reset-to: commit the planned offsets (stop every `refetch run` of the group first).
    #[arg(long, requires = "reset_to", conflicts_with = "dry_run")]
    pub execute: bool,
    /// With --reset-to: print the plan only (the default; kept for scripts that pass it).
    #[arg(long, requires = "reset_to")]
    pub dry_run: bool,
}

/// `refetch dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Print dead letters with their `refetch.*` headers.
    #[command(after_help = "Example:\n  refetch dlq list --config crm.toml --limit 20")]
    List(DlqListArgs),
    /// Run chosen dead letters through the pipeline again.
    #[command(after_help = "\
By default the entities named by the records' refetch.entity.type / refetch.entity.id headers are refreshed now through the engine's single flight. --to-retry-topic republishes them to the configured retry topic (which `refetch run` subscribes to) instead; --to-source-topic writes records that kept their original payload (decode failures) back to their source topic.

Examples:
  refetch dlq redrive --config crm.toml --all --dry-run
  refetch dlq redrive --config crm.toml --reason fetch
  refetch dlq redrive --config crm.toml --record 0:17 --record 2:4 --to-retry-topic")]
    Redrive(DlqRedriveArgs),
}

/// `refetch dlq list`.
#[derive(Debug, Clone, Args)]
pub struct DlqListArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print at most this many records (the oldest first).
    #[arg(long)]
    pub limit: Option<usize>,
    /// One JSON object per record instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `refetch dlq redrive`.
#[derive(Debug, Clone, Args)]
pub struct DlqRedriveArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Every dead letter.
    #[arg(long, conflicts_with_all = ["records"])]
    pub all: bool,
    /// A dead letter by its coordinates in the dead-letter topic, PARTITION:OFFSET (repeatable).
    #[arg(long = "record", value_name = "PARTITION:OFFSET")]
    pub records: Vec<String>,
    /// Only dead letters with this `refetch.reason` (decode, id_too_long, unknown_type, fetch,
    /// sink).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters of this entity type.
    #[arg(long)]
    pub entity_type: Option<String>,
    /// Republish to the retry topic (`[kafka] retry_topic`) instead of refreshing here.
    #[arg(long, conflicts_with = "to_source_topic")]
    pub to_retry_topic: bool,
    /// Write records that kept their original payload back to their source topic.
    #[arg(long)]
    pub to_source_topic: bool,
    /// Show what would be redriven without doing it.
    #[arg(long)]
    pub dry_run: bool,
}

/// `refetch demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Notifications to stream.
    #[arg(long, default_value_t = 30_000)]
    pub notifications: usize,
    /// Customers at the demo source.
    #[arg(long, default_value_t = 3_000)]
    pub entities: usize,
    /// Events per save (one save changes phone, address, email, ... and announces each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub duplicates: u32,
    /// The coalescing window (a key is fetched once it was quiet this long).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Seed of the generated changes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Notifications per second the demo produces (0: as fast as possible).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Where to serve the status page and /metrics while the demo runs (`off` to disable).
    #[arg(long, default_value = "127.0.0.1:9464", value_parser = parse_listen)]
    pub listen: Listen,
}

/// A listen address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    crate::config::parse_listen_address(s)
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{e}, or `off`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn demo_flags_parse() {
        let cli = Cli::try_parse_from([
            "refetch",
            "demo",
            "--notifications",
            "10",
            "--window",
            "50ms",
            "--listen",
            "off",
        ])
        .expect("parses");
        let Command::Demo(d) = cli.command else {
            panic!("not demo")
        };
        assert_eq!(d.notifications, 10);
        assert_eq!(d.window, Duration::from_millis(50));
        assert_eq!(d.listen, Listen(None));
        assert!(Cli::try_parse_from(["refetch", "demo", "--duplicates", "0"]).is_err());
        assert!(Cli::try_parse_from(["refetch", "fetch", "--config", "x.toml"]).is_err());
    }
}
