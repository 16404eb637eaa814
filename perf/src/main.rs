//! `shoal-perf`: Shoal's benchmark harness.
//!
//! Modes:
//! - `storage`: drives one partition log directly (no network): append
//!   bandwidth and append latency per sync mode, and reopen times.
//! - `produce`: producers as fast as acknowledged or at a rate; ack latency.
//! - `consume`: reading a topic back (fetch or push), after filling it.
//! - `e2e`: open-loop publishing at a fixed rate, latency from each
//!   message's intended send time to its delivery (coordinated omission
//!   corrected), and the produce-ack latency.
//! - `hiccup`: the platform's own stalls on the given cores, turned into the
//!   latency a zero-cost service would show: the floor under `e2e`.
//! - `ping`: open-loop round trips that touch no data (an empty fetch): the
//!   floor the protocol, network stack, client and request loop put under
//!   `e2e`.
//! - `groups`: consumer groups: offset-commit throughput and latency, the
//!   restart of a coordinator after kill -9 with many commits, and the
//!   time a joining member takes to its first data.
//! - `compare`: two `--json` runs side by side, optionally plotted.
//!
//! Every latency goes through HdrHistogram; `--json`, `--hist` and `--plot`
//! write machine-readable results, the percentile distribution and an SVG
//! percentile curve.

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

mod groups;
mod hiccup;
mod net;
mod report;
mod storage;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "shoal-perf",
    version,
    about = "Shoal benchmark harness: throughput and latency percentiles"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Drive the shard log directly, no network.
    Storage(storage::StorageArgs),
    /// Produce as fast as acknowledged (or at --rate) and report throughput and ack latency.
    Produce(net::ProduceArgs),
    /// Read a topic back (fill it first with --spawn or --fill).
    Consume(net::ConsumeArgs),
    /// Open-loop end-to-end latency at a fixed rate.
    E2e(net::E2eArgs),
    /// Platform stalls per core, and the latency they alone would cause (same-run baseline for e2e).
    Hiccup(hiccup::HiccupArgs),
    /// Open-loop round trips that touch no data: the transport floor under e2e.
    Ping(net::PingArgs),
    /// Consumer groups: offset-commit throughput and latency, restart
    /// after kill -9 with many commits, rebalance time.
    Groups(groups::GroupsArgs),
    /// Compare two --json results.
    Compare(net::CompareArgs),
    /// (internal) append until killed; used by `storage --reopen`.
    #[command(hide = true)]
    StorageWriter(storage::WriterArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.mode {
        Mode::Storage(a) => storage::run(a),
        Mode::Produce(a) => net::produce(a),
        Mode::Consume(a) => net::consume(a),
        Mode::E2e(a) => net::e2e(a),
        Mode::Compare(a) => net::compare(a),
        Mode::Groups(a) => groups::run(a),
        Mode::Ping(a) => net::ping(a),
        Mode::Hiccup(a) => hiccup::run(a),
        Mode::StorageWriter(a) => storage::writer(a),
    };
    if let Err(e) = r {
        eprintln!("shoal-perf: {e}");
        std::process::exit(1);
    }
}
