//! The `shoal` binary: the broker (`shoal serve`) and its CLI.

use clap::{Parser, Subcommand, ValueEnum};
use mimalloc::MiMalloc;
use shoal_client::cli;
use shoal_core::{config, logging, server};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a thread-per-core message broker"
)]
struct Cli {
    /// Broker to talk to (client commands).
    #[arg(long, global = true, default_value = "127.0.0.1:9400")]
    broker: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker: one shard per core, single node, no ZooKeeper needed.
    Serve {
        /// Public address; shard i also listens on port+1+i.
        #[arg(long)]
        listen: Option<String>,
        /// Where partitions and topic metadata live.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Cores to run shards on: all (the CPUs of this process's affinity
        /// mask), 0,1 or 0-3.
        #[arg(long)]
        cores: Option<String>,
        /// Core plan from `tuning/shoal-tune core-plan`: shard i on
        /// shard_cores[i], other threads on control_core (instead of --cores).
        #[arg(long)]
        core_plan: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (default: off).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
        /// Log lines as text or json (one object per line), to stderr.
        #[arg(long, value_name = "text|json")]
        log_format: Option<String>,
        /// TOML file with any of the settings (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create, list, describe or delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce one message per stdin line; exits when stdin closes and all are acknowledged.
    Produce {
        topic: String,
        /// Key for every message (chooses the partition by hash).
        #[arg(long)]
        key: Option<String>,
        /// Send to this partition.
        #[arg(long)]
        partition: Option<u32>,
        #[arg(long, value_enum, default_value = "leader")]
        acks: AcksArg,
    },
    /// Print message values, one per line.
    Consume {
        topic: String,
        /// Start at the oldest message (default: only new ones).
        #[arg(long)]
        from_beginning: bool,
        /// Stop after N messages.
        #[arg(long)]
        count: Option<u64>,
        /// Keep waiting for new messages (default: stop at the end).
        #[arg(long)]
        follow: bool,
        /// Read only this partition.
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Print the broker's counters.
    Metrics,
}

#[derive(Subcommand)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// always | interval:<ms> | none (default: the broker's default_sync)
        #[arg(long)]
        sync: Option<String>,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[arg(long)]
        retention_bytes: Option<u64>,
        #[arg(long)]
        segment_bytes: Option<u64>,
    },
    List,
    Describe {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AcksArg {
    None,
    Leader,
}

fn main() {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    // `serve` starts logging once its configuration (and so its log
    // format) is read.
    if !serving {
        logging::init("warn", logging::LogFormat::Text);
    }
    let b = &cli.broker;
    let r = match cli.command {
        Command::Serve {
            listen,
            data_dir,
            cores,
            core_plan,
            metrics_listen,
            log_format,
            config,
        } => config::Config::load(&config::Overrides {
            listen,
            data_dir,
            cores,
            core_plan,
            metrics_listen,
            log_format,
            config,
        })
        .and_then(|c| {
            logging::init("info", c.log_format);
            server::run(c)
        })
        .map_err(|e| e.to_string()),
        Command::Topic { command } => match command {
            TopicCommand::Create {
                name,
                partitions,
                sync,
                retention_ms,
                retention_bytes,
                segment_bytes,
            } => cli::topic_create(
                b,
                shoal_client::NewTopic {
                    name,
                    partitions,
                    sync,
                    retention_ms,
                    retention_bytes,
                    segment_bytes,
                },
            ),
            TopicCommand::List => cli::topic_list(b),
            TopicCommand::Describe { name } => cli::topic_describe(b, &name),
            TopicCommand::Delete { name } => cli::topic_delete(b, &name),
        },
        Command::Produce {
            topic,
            key,
            partition,
            acks,
        } => {
            let acks = match acks {
                AcksArg::None => shoal_client::Acks::None,
                AcksArg::Leader => shoal_client::Acks::Leader,
            };
            cli::produce(b, &topic, key, partition, acks)
        }
        Command::Consume {
            topic,
            from_beginning,
            count,
            follow,
            partition,
        } => cli::consume(b, &topic, from_beginning, count, follow, partition),
        Command::Metrics => cli::metrics(b),
    };
    if let Err(e) = r {
        eprintln!("shoal: {e}");
        std::process::exit(1);
    }
}
