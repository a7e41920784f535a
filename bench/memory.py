"""Resident memory of a server process across repeated rounds of large legitimate images and abuse: a leak shows as
growth per round, the allocator's high-water mark as the peak of a round."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench import hostile, photos
from bench.servers import served, served_model

MiB = 1024 * 1024


def proc_status(pid: int, key: str) -> int:
    """The number on a line of /proc/<pid>/status: KiB for `VmRSS` and `VmHWM`, a count for `Threads`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def peak_mib(pid: int) -> float:
    """The resident peak since the last `reset_peak` (VmHWM)."""
    return proc_status(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Round:
    """The answers of one round by status, and the server's memory around it."""

    before_mib: float
    peak_mib: float
    after_mib: float
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # probes answered outside the contract


@dataclass
class Workload:
    """What one round sends at once: `photos` 12-megapixel JPEGs, `big_bodies` chunked bodies of 4x the body
    limit (the server must read up to its limit to refuse them), then the whole hostile set one by one."""

    host: str
    port: int
    model: str
    max_body_bytes: int
    photos: list[bytes]
    big_bodies: int = 8
    probes: bool = True

    async def run(self, pid: int) -> Round:
        reset_peak(pid)
        before, statuses, unexpected = rss_mib(pid), Counter(), []
        await asyncio.gather(*(self._photo(p, statuses, unexpected) for p in self.photos),
                             *(self._big_body(statuses, unexpected) for _ in range(self.big_bodies)))  # fmt: skip
        for probe in hostile.probes(self.model, self.max_body_bytes) if self.probes else []:
            answer = await probe.send(self.host, self.port)
            _count(probe, answer.status, statuses, unexpected)
        await asyncio.sleep(1.5)  # the last answers released, and the idle heap trim (at most once a second) done
        return Round(before, peak_mib(pid), rss_mib(pid), dict(statuses), unexpected)

    async def _photo(self, data: bytes, statuses: Counter, unexpected: list) -> None:
        probe = hostile.Probe("12 MP JPEG", "/classify", {"Content-Type": "image/jpeg"}, data, (200,))
        _count(probe, (await probe.send(self.host, self.port)).status, statuses, unexpected)

    async def _big_body(self, statuses: Counter, unexpected: list) -> None:
        huge = 4 * self.max_body_bytes
        probe = hostile.Probe("chunked 4x the body limit", "/classify", {"Content-Type": "image/jpeg"},
                              lambda: hostile.zeros(huge), (413, 0))  # fmt: skip
        _count(probe, (await probe.send(self.host, self.port)).status, statuses, unexpected)


def _count(probe: hostile.Probe, status: int, statuses: Counter, unexpected: list) -> None:
    statuses[str(status)] += 1
    if not probe.allows(status):
        unexpected.append(f"{probe.name}: {status}, expected {probe.expected}")


def run_rounds(url: str, pid: int, model: str, max_body_bytes: int, rounds: int) -> dict:
    """`rounds` rounds against the server at `url` (process `pid`, on this machine): memory at start and per round."""
    parts = urlsplit(url)
    workload = Workload(parts.hostname, parts.port, model, max_body_bytes, photos.jpegs(photos.MEGAPIXEL_12, 16))
    start = rss_mib(pid)
    results = [asyncio.run(workload.run(pid)) for _ in range(rounds)]
    return {"start_mib": start, "rounds": [asdict(r) for r in results]}


def summary(report: dict) -> str:
    lines = [f"start: {report['start_mib']:.1f} MiB resident"]
    for i, r in enumerate(report["rounds"], 1):
        growth = r["peak_mib"] - r["before_mib"]
        line = f"round {i}: before {r['before_mib']:.1f}, peak {r['peak_mib']:.1f} (+{growth:.1f}), "
        line += f"after {r['after_mib']:.1f} MiB; answers {r['statuses']}"
        lines.append(line + (f"; UNEXPECTED {r['unexpected']}" if r["unexpected"] else ""))
    return "\n".join(lines)


def run_memory(args: argparse.Namespace) -> int:
    """`srvit bench memory`: start a server with the given environment, run the rounds, print and save them."""
    env = dict(item.split("=", 1) for item in args.env) | {"SRVIT_MAX_BODY_BYTES": str(args.max_body_bytes)}
    with served(args.repo, env, ready_timeout_s=300) as server:
        model = args.model or served_model(server.url, None)["name"]
        started = time.monotonic()
        report = run_rounds(server.url, server.process.pid, model, args.max_body_bytes, args.rounds)
        report |= {"env": env, "seconds": round(time.monotonic() - started, 1)}
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if any(r["unexpected"] for r in report["rounds"]) else 0
