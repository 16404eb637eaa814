//! The seam between broker logic and the executor: spawning, timers, the
//! clock and blocking work. Broker code calls these instead of glommio
//! directly, so the same logic can later run under a seeded, deterministic
//! executor with injected faults (replication and failover tests, like
//! Iggy's simulator or TigerBeetle's VOPR). One seam for the whole broker:
//! it lives in the storage engine, the lowest layer that spawns, and the
//! broker uses it as is.

pub use shoal_shard::rt::*;
