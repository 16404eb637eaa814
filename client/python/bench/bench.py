#!/usr/bin/env python3
"""Produce and consume throughput of the Python client against the Rust
client (``shoal-perf``), in the same run, against one broker.

Starts a release broker (``--shoal``) pinned to ``--broker-core`` on a free
127.0.0.1 port with a temporary data directory, pins itself and
``shoal-perf`` to ``--client-core``, and runs ``--runs`` rounds of:

- Rust produce: ``shoal-perf produce`` (1 producer, batch 64 KiB, linger
  1 ms, acks leader; acknowledged messages per second after its warm-up);
- Python produce, blocking and asyncio: the same settings (they are the
  defaults of both clients), one partition, sending as fast as the buffer
  lets for ``--duration`` seconds after a warm-up, then a flush; messages
  acknowledged / (time from the first send to the flush's end);
- Rust consume: ``shoal-perf consume --fill`` fills a fresh topic with
  ``--fill-mib`` of messages, then reads it back with fetches of 4 MiB,
  counting records from batch headers (no record decoding);
- Python consume of that same topic, warm in the page cache as it was for
  Rust: ``Consumer.poll`` (every record decoded into a ``Record``, CRC32C
  checked), and raw fetches of 4 MiB counting records from batch headers as
  shoal-perf does.

Prints each run and the median of the runs (``--json`` for machines). The
broker is stopped (SIGTERM, by PID) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import shoal
from shoal.batch import count_records

REPO = Path(__file__).resolve().parents[3]


def free_port(n_after: int) -> int:
    import random

    for _ in range(200):
        base = 10000 + random.randrange(20000)
        try:
            socks = []
            for i in range(n_after + 1):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


class Broker:
    def __init__(self, binary: str, core: int):
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
        self.port = free_port(1)
        self.addr = f"127.0.0.1:{self.port}"
        self.log = open(self.dir / "broker.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", self.addr, "--cores", str(core), "--data-dir", str(self.dir / "data")],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env={**os.environ, "RUST_LOG": "info"},
        )
        deadline = time.monotonic() + 30
        while b"shoal is ready" not in (self.dir / "broker.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "broker.log").read_text(errors="replace"))
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def perf(binary: str, mode: str, *args: str) -> dict:
    out = subprocess.run([binary, mode, *args, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"shoal-perf {mode} failed: {out.stderr.decode(errors='replace')}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def py_produce_blocking(addr: str, topic: str, size: int, warmup: float, duration: float) -> float:
    with shoal.Client(addr) as c:
        c.create_topic(topic, partitions=1, sync="interval:100")
        p = shoal.Producer(c)
        value = b"\x5a" * size
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            p.send(topic, value)
        p.flush()
        n = 0
        t0 = time.perf_counter()
        end = t0 + duration
        send = p.send
        while True:
            for _ in range(64):
                send(topic, value)
            n += 64
            if time.perf_counter() >= end:
                break
        p.flush()
        elapsed = time.perf_counter() - t0
        p.close()
    return n / elapsed


def py_produce_async(addr: str, topic: str, size: int, warmup: float, duration: float) -> float:
    async def main() -> float:
        async with shoal.aio.Client(addr) as c:
            await c.create_topic(topic, partitions=1, sync="interval:100")
            p = shoal.aio.Producer(c)
            value = b"\x5a" * size
            end = time.perf_counter() + warmup
            while time.perf_counter() < end:
                await p.send(topic, value)
            await p.flush()
            n = 0
            t0 = time.perf_counter()
            end = t0 + duration
            while True:
                for _ in range(64):
                    await p.send(topic, value)
                n += 64
                if time.perf_counter() >= end:
                    break
            await p.flush()
            elapsed = time.perf_counter() - t0
            await p.close()
            return n / elapsed

    return asyncio.run(main())


def py_consume_poll(addr: str, topic: str) -> float:
    with shoal.Client(addr) as c:
        cons = shoal.Consumer(c, max_bytes=4 << 20)
        cons.assign(topic, 0, "beginning")
        hw = c.fetch(topic, 0, 0, timestamp_ms=2**63 - 1, max_bytes=1, min_bytes=0).high_watermark
        n = 0
        t0 = time.perf_counter()
        while cons.position(topic, 0) < hw:
            n += len(cons.poll(timeout=1.0))
        return n / (time.perf_counter() - t0)


def py_consume_raw(addr: str, topic: str) -> float:
    with shoal.Client(addr) as c:
        info = c.fetch(topic, 0, 0, timestamp_ms=2**63 - 1, max_bytes=1, min_bytes=0)
        hw, at, n = info.high_watermark, info.log_start_offset, 0
        t0 = time.perf_counter()
        while at < hw:
            fr = c.fetch(topic, 0, at, max_bytes=4 << 20, min_bytes=0)
            records, _ = count_records(fr.payload)
            n += records
            at = fr.next_offset
        return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoal", default=os.environ.get("SHOAL_BIN", str(REPO / "target/release/shoal")))
    ap.add_argument("--perf", default=os.environ.get("SHOAL_PERF_BIN", str(REPO / "target/release/shoal-perf")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds of each produce run")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=1024, help="message value bytes")
    ap.add_argument("--fill-mib", type=int, default=256, help="MiB the consume runs read")
    ap.add_argument("--broker-core", type=int, default=0)
    ap.add_argument("--client-core", type=int, default=min(1, (os.cpu_count() or 1) - 1))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.client_core})
    broker = Broker(a.shoal, a.broker_core)
    rows = {k: [] for k in ("rust produce", "python produce (blocking)", "python produce (asyncio)",
                            "rust consume (fetch, headers only)", "python consume (poll: records, CRC checked)",
                            "python consume (raw fetch, headers only)")}
    try:
        for run in range(a.runs):
            tag = f"{os.getpid()}-{run}"
            r = perf(a.perf, "produce", "--broker", broker.addr, "--duration", f"{a.duration}s",
                     "--warmup", f"{a.warmup}s", "--size", str(a.size), "--core", str(a.client_core),
                     "--topic", f"bench-rust-produce-{tag}")
            rows["rust produce"].append(r["msgs_per_s"])
            rows["python produce (blocking)"].append(
                py_produce_blocking(broker.addr, f"bench-py-produce-{tag}", a.size, a.warmup, a.duration))
            rows["python produce (asyncio)"].append(
                py_produce_async(broker.addr, f"bench-py-aproduce-{tag}", a.size, a.warmup, a.duration))
            topic = f"bench-consume-{tag}"
            r = perf(a.perf, "consume", "--broker", broker.addr, "--fill", "--fill-bytes", str(a.fill_mib << 20),
                     "--size", str(a.size), "--core", str(a.client_core), "--topic", topic)
            rows["rust consume (fetch, headers only)"].append(r["msgs_per_s"])
            rows["python consume (poll: records, CRC checked)"].append(py_consume_poll(broker.addr, topic))
            rows["python consume (raw fetch, headers only)"].append(py_consume_raw(broker.addr, topic))
            if not a.json:
                print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), file=sys.stderr)
    finally:
        broker.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    if a.json:
        print(json.dumps({"size": a.size, "runs": rows, "median_msgs_per_s": med, "python": sys.version.split()[0],
                          "crc32c": shoal.CRC32C_BACKEND}))
    else:
        print(f"{a.size}-byte messages, median of {a.runs} runs (msgs/s), Python {sys.version.split()[0]}, "
              f"CRC32C {shoal.CRC32C_BACKEND}:")
        for k, v in med.items():
            print(f"  {k:<46} {v:>12,.0f}   ({v * a.size / 1048576:,.1f} MiB/s)")
        print(f"  python/rust produce (blocking) {med['python produce (blocking)'] / med['rust produce']:.0%}, "
              f"consume (poll) {med['python consume (poll: records, CRC checked)'] / med['rust consume (fetch, headers only)']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
