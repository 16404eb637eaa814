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
    /// Cluster to talk to (client commands): host:port, host:port,host:port,...
    /// or zk://host:port[,host:port][/chroot][?cluster=NAME].
    #[arg(long, global = true, default_value = "127.0.0.1:9400")]
    broker: String,
    /// File caching the broker list, used when --broker is unreachable; `off`
    /// disables it [default: $SHOAL_DISCOVERY_CACHE, else ~/.cache/shoal/].
    #[arg(long, global = true)]
    discovery_cache: Option<String>,
    /// Authenticate as this user (SCRAM-SHA-256), with the password in
    /// $SHOAL_PASSWORD [default: $SHOAL_USER]. There is no password flag.
    #[arg(long, global = true, value_name = "NAME")]
    user: Option<String>,
    /// Read `user = NAME` and `password = SECRET` from this file instead.
    #[arg(long, global = true, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
    /// TLS: PEM file of the CA certificates to trust. Client commands:
    /// connect with TLS and verify the brokers against it [default:
    /// $SHOAL_TLS_CA]. serve: verify other brokers against it (TOML tls_ca).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// TLS: PEM certificate (then its chain). Client commands: a client
    /// certificate, presented when the broker asks [default:
    /// $SHOAL_TLS_CERT]. serve: the broker's certificate; the ports then
    /// speak only TLS (TOML tls_cert).
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS: PEM private key of --tls-cert [default: $SHOAL_TLS_KEY] (TOML tls_key).
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// TLS: verify brokers' certificates against this DNS name instead of
    /// the host each was reached by (serve: instead of the other broker's
    /// advertised host) [default: $SHOAL_TLS_SERVER_NAME] (TOML tls_server_name).
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker: one shard per core. Alone by default (no ZooKeeper
    /// needed); with --zookeeper and --broker-id, a member of a cluster.
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
        /// Join a cluster: ZooKeeper as host:port[,host:port...][/chroot].
        #[arg(long)]
        zookeeper: Option<String>,
        /// This broker's id in the cluster (unique; needed with --zookeeper).
        #[arg(long)]
        broker_id: Option<u32>,
        /// Cluster name (several clusters can share one ZooKeeper) [default: default].
        #[arg(long)]
        cluster: Option<String>,
        /// Rack (or zone) of this broker: replicas of a partition go to different racks.
        #[arg(long)]
        rack: Option<String>,
        /// Require authentication (SCRAM-SHA-256) and apply ACLs (TOML auth = true).
        #[arg(long)]
        auth: bool,
        /// With --auth, when no user exists yet: create this superuser with
        /// the password in $SHOAL_ADMIN_PASSWORD (TOML superuser).
        #[arg(long, value_name = "NAME")]
        superuser: Option<String>,
        /// With --tls-cert: PEM file of the CAs client certificates are
        /// verified against; a verified certificate's subject CN (else first
        /// DNS name) is the connection's principal, without SCRAM (TOML
        /// tls_client_ca).
        #[arg(long, value_name = "FILE")]
        tls_client_ca: Option<PathBuf>,
        /// none | requested | required: whether clients present a
        /// certificate [default: requested with --tls-client-ca, else none]
        /// (TOML tls_client_auth).
        #[arg(long, value_name = "MODE")]
        tls_client_auth: Option<String>,
    },
    /// Create, delete or list users (brokers started with --auth; needs a
    /// superuser or admin on the cluster).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Add, remove or list ACLs: which user may produce, consume, describe
    /// or administer which topics and groups.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Create, list, describe or delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce one message per stdin line (raw bytes); retries through a
    /// failover; exits 0 only when every line is acknowledged.
    Produce {
        topic: String,
        /// Key for every message (chooses the partition by hash).
        #[arg(long)]
        key: Option<String>,
        /// Send to this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// none | leader | all (all: every in-sync replica holds it;
        /// survives a failover).
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
        #[arg(long, conflicts_with = "group")]
        partition: Option<u32>,
        /// Consume as a member of this group: read the partitions the group
        /// assigns, commit what was printed, follow until Ctrl-C or SIGTERM
        /// (then commit and leave the group). --from-beginning: partitions
        /// without a committed offset start at the oldest message.
        #[arg(long)]
        group: Option<String>,
        /// With --group: the member's session timeout.
        #[arg(long, requires = "group", value_name = "MS")]
        session_timeout_ms: Option<u64>,
    },
    /// List, describe consumer groups; reset their offsets.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Print the broker's counters.
    Metrics,
    /// Cluster-wide views.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user: the password is read from $SHOAL_NEW_PASSWORD, else
    /// from the first line of stdin.
    Create {
        name: String,
        /// Set the password of an existing user instead.
        #[arg(long)]
        replace: bool,
    },
    Delete {
        name: String,
    },
    List,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("resource").required(true).args(["topic", "topic_prefix", "group", "group_prefix", "cluster"])))]
struct AclArgs {
    /// The user the rule is for.
    #[arg(long)]
    principal: String,
    /// A topic by exact name.
    #[arg(long)]
    topic: Option<String>,
    /// Every topic whose name starts with this.
    #[arg(long)]
    topic_prefix: Option<String>,
    /// A consumer group by exact name.
    #[arg(long)]
    group: Option<String>,
    /// Every group whose name starts with this.
    #[arg(long)]
    group_prefix: Option<String>,
    /// The cluster (metrics: describe; users and ACLs: admin).
    #[arg(long)]
    cluster: bool,
    /// produce | consume | describe | admin
    #[arg(long)]
    operation: String,
}

impl AclArgs {
    fn acl(self) -> Result<shoal_client::Acl, String> {
        use shoal_client::AclResource as R;
        let resource = match (self.topic, self.topic_prefix, self.group, self.group_prefix) {
            (Some(t), ..) => R::Topic(t),
            (_, Some(p), ..) => R::TopicPrefix(p),
            (_, _, Some(g), _) => R::Group(g),
            (_, _, _, Some(p)) => R::GroupPrefix(p),
            _ => R::Cluster,
        };
        let operation = shoal_client::AclOperation::parse(&self.operation).ok_or_else(|| {
            format!(
                "unknown operation {:?}: produce, consume, describe or admin",
                self.operation
            )
        })?;
        Ok(shoal_client::Acl {
            principal: self.principal,
            resource,
            operation,
        })
    }
}

#[derive(Subcommand)]
enum AclCommand {
    /// Allow a user an operation on a resource.
    Add(AclArgs),
    /// Take a rule away (open connections are checked against the new rules at once).
    Remove(AclArgs),
    List {
        /// Only this user's rules.
        #[arg(long)]
        principal: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Brokers, the controller, partition and leader counts per broker,
    /// under-replicated and offline partitions.
    Status {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Every group, its state and member count.
    List {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Members and their assignments; per partition the committed offset,
    /// log end offset and lag.
    Describe {
        group: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Move the group's committed offsets of a topic (only while the group
    /// has no members).
    #[command(group(clap::ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_offset"])))]
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// Each partition's oldest retained offset.
        #[arg(long)]
        to_earliest: bool,
        /// Each partition's end (high watermark).
        #[arg(long)]
        to_latest: bool,
        /// This offset (kept within each partition's log).
        #[arg(long, value_name = "N")]
        to_offset: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Copies of each partition, on as many brokers.
        #[arg(long, default_value_t = 1)]
        replication: u16,
        /// always | interval:<ms> | none (default: the broker's default_sync)
        #[arg(long)]
        sync: Option<String>,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[arg(long)]
        retention_bytes: Option<u64>,
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// acks=all needs this many in-sync replicas (default: min(2, replication)).
        #[arg(long)]
        min_insync_replicas: Option<u16>,
        /// Let a replica outside the in-sync set lead when no in-sync one is
        /// alive: the partition stays available but may lose acknowledged data.
        #[arg(long)]
        unclean_leader_election: bool,
    },
    List,
    Describe {
        name: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AcksArg {
    None,
    Leader,
    All,
}

fn main() {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    // `serve` starts logging once its configuration (and so its log
    // format) is read.
    if !serving {
        logging::init("warn", logging::LogFormat::Text);
    }
    let tls_files = shoal_client::TlsFiles {
        ca: cli.tls_ca.clone().unwrap_or_default(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
        server_name: cli.tls_server_name.clone(),
    };
    let b = &match cli::Endpoint::new(&cli.broker, cli.discovery_cache.as_deref())
        .with_credentials(cli.user.as_deref(), cli.credentials_file.as_deref())
        .and_then(|e| {
            if serving {
                Ok(e)
            } else {
                e.with_tls(&tls_files)
            }
        }) {
        Ok(b) => b,
        Err(e) if !serving => {
            eprintln!("shoal: {e}");
            std::process::exit(1);
        }
        // `serve` takes no client credentials.
        Err(_) => cli::Endpoint::new(&cli.broker, cli.discovery_cache.as_deref()),
    };
    let r = match cli.command {
        Command::Serve {
            listen,
            data_dir,
            cores,
            core_plan,
            metrics_listen,
            log_format,
            config,
            zookeeper,
            broker_id,
            cluster,
            rack,
            auth,
            superuser,
            tls_client_ca,
            tls_client_auth,
        } => tls_client_auth
            .as_deref()
            .map(str::parse)
            .transpose()
            .and_then(|client_auth| {
                config::Config::load(&config::Overrides {
                    listen,
                    data_dir,
                    cores,
                    core_plan,
                    metrics_listen,
                    log_format,
                    config,
                    zookeeper,
                    broker_id,
                    cluster,
                    rack,
                    auth,
                    superuser,
                    tls: shoal_core::auth::tls::TlsSettings {
                        cert: cli.tls_cert,
                        key: cli.tls_key,
                        client_ca: tls_client_ca,
                        client_auth,
                        ca: cli.tls_ca,
                        server_name: cli.tls_server_name,
                    },
                })
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
                replication,
                sync,
                retention_ms,
                retention_bytes,
                segment_bytes,
                min_insync_replicas,
                unclean_leader_election,
            } => cli::topic_create(
                b,
                shoal_client::NewTopic {
                    name,
                    partitions,
                    replication_factor: replication,
                    sync,
                    retention_ms,
                    retention_bytes,
                    segment_bytes,
                    min_insync_replicas,
                    unclean_leader_election,
                },
            ),
            TopicCommand::List => cli::topic_list(b),
            TopicCommand::Describe { name, json } => cli::topic_describe(b, &name, json),
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
                AcksArg::All => shoal_client::Acks::All,
            };
            cli::produce(b, &topic, key, partition, acks)
        }
        Command::Consume {
            topic,
            from_beginning,
            count,
            group: Some(group),
            session_timeout_ms,
            ..
        } => cli::consume_group(
            b,
            &topic,
            &cli::GroupConsume {
                group,
                from_beginning,
                count,
                session_timeout: session_timeout_ms.map(std::time::Duration::from_millis),
            },
        ),
        Command::Consume {
            topic,
            from_beginning,
            count,
            follow,
            partition,
            group: None,
            ..
        } => cli::consume(b, &topic, from_beginning, count, follow, partition),
        Command::Group { command } => match command {
            GroupCommand::List { json } => cli::group_list(b, json),
            GroupCommand::Describe { group, json } => cli::group_describe(b, &group, json),
            GroupCommand::ResetOffsets {
                group,
                topic,
                to_earliest,
                to_latest,
                to_offset,
            } => match (to_earliest, to_latest, to_offset) {
                (true, _, _) => Ok(cli::ResetTo::Earliest),
                (_, true, _) => Ok(cli::ResetTo::Latest),
                (_, _, Some(n)) => Ok(cli::ResetTo::Offset(n)),
                _ => Err("give --to-earliest, --to-latest or --to-offset N".to_string()),
            }
            .and_then(|to| cli::group_reset_offsets(b, &group, &topic, to)),
        },
        Command::Metrics => cli::metrics(b),
        Command::User { command } => match command {
            UserCommand::Create { name, replace } => cli::user_create(b, &name, replace),
            UserCommand::Delete { name } => cli::user_delete(b, &name),
            UserCommand::List => cli::user_list(b),
        },
        Command::Acl { command } => match command {
            AclCommand::Add(a) => a.acl().and_then(|acl| cli::acl_change(b, &acl, true)),
            AclCommand::Remove(a) => a.acl().and_then(|acl| cli::acl_change(b, &acl, false)),
            AclCommand::List { principal } => cli::acl_list(b, principal.as_deref()),
        },
        Command::Cluster {
            command: ClusterCommand::Status { json },
        } => cli::cluster_status(b, json),
    };
    if let Err(e) = r {
        eprintln!("shoal: {e}");
        std::process::exit(1);
    }
}
