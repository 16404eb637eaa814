//! `shoal-perf`: Shoal's benchmark harness.
//!
//! Modes:
//! - `storage`: drives one partition log directly (no network): append
//!   bandwidth and append latency per sync mode, and reopen times.

use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

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
    /// (internal) append until killed; used by `storage --reopen`.
    #[command(hide = true)]
    StorageWriter(storage::WriterArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.mode {
        Mode::Storage(a) => storage::run(a),
        Mode::StorageWriter(a) => storage::writer(a),
    };
    if let Err(e) = r {
        eprintln!("shoal-perf: {e}");
        std::process::exit(1);
    }
}
