"""`srvit bench soak`: mixed traffic on every protocol with faults for minutes on end; afterwards every request must
have exactly one answer, every good answer must be right, and memory, file descriptors and threads must not grow.

The traffic: good images at random depths (auto too) over /classify, V2 HTTP and V2 gRPC; the hostile set
(bench/hostile.py) and malformed gRPC requests; clients that hang up (HTTP) or cancel (gRPC) while queued; and
bursts of twice max_in_flight requests at the deepest depth. Every request carries a unique request id; the
server's JSON log lines are the ledger of what it answered. A good answer is right when its top-1 class is the
one the same server gave the same image at the same depth when idle, before the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_client
from tritonclient.utils import InferenceServerException

from bench import hostile
from bench.images import load_pngs
from bench.memory import proc_status, rss_mib
from bench.servers import served, served_model
from modelrepo.idx import FASHION_MNIST_DIR

DEPTH_CHOICES = ("1", "2", "3", "4", "auto")
BURST = 128  # requests at once: twice the default max_in_flight
QUIET_S = 2.0  # between segments of traffic: long enough for every request to end
ALLOWED_5XX = {(503, "overloaded")}  # the contract's answer to a burst; anything else 5xx is a failure


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    threads: int


def sample(pid: int, t0: float) -> Sample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(time.monotonic() - t0, rss_mib(pid), fds, proc_status(pid, "Threads"))


def slope_mib_per_min(samples: list[Sample]) -> float:
    """The Theil-Sen slope of resident memory over time: the median of the slopes between every two samples,
    so one sample caught mid-release (+16 MiB once in a 15-minute run) cannot hide a steady creep, as it would
    in a least-squares fit."""
    t = np.array([s.t_s for s in samples]) / 60
    rss = np.array([s.rss_mib for s in samples])
    i, j = np.triu_indices(len(samples), k=1)
    return float(np.median((rss[j] - rss[i]) / (t[j] - t[i]))) if len(samples) >= 3 else float("nan")


@dataclass
class Ledger:
    """What the client sent and saw."""

    sent: dict[str, str] = field(default_factory=dict)  # request id -> kind
    answers: Counter = field(default_factory=Counter)  # (protocol, status) -> count
    wrong: list[str] = field(default_factory=list)  # good requests answered with another class
    unexpected: list[str] = field(default_factory=list)  # answers outside the contract for their request

    def record(self, rid: str, protocol: str, status: int | str, allowed: bool) -> None:
        self.answers[(protocol, str(status))] += 1
        if not allowed:
            self.unexpected.append(f"{rid} ({self.sent[rid]}): {status}")


@dataclass
class Soak:
    host: str
    port: int
    grpc_url: str
    model: str
    pngs: list[bytes]
    max_body_bytes: int = 16 * 1024 * 1024
    seed: int = 0
    truth: dict[tuple[int, int], int] = field(default_factory=dict)  # (image, depth) -> class when idle
    ledger: Ledger = field(default_factory=Ledger)

    def __post_init__(self):
        self.rng, self.ids = random.Random(self.seed), itertools.count()
        self.probes = hostile.probes(self.model, self.max_body_bytes)
        self.url = f"http://{self.host}:{self.port}"

    def new_id(self, kind: str) -> str:
        rid = f"soak-{next(self.ids)}"
        self.ledger.sent[rid] = kind
        return rid

    # -- the reference answers and the traffic --------------------------------------------------------------

    async def learn_truth(self, http: aiohttp.ClientSession) -> None:
        for (i, png), depth in itertools.product(enumerate(self.pngs), (1, 2, 3, 4)):
            status, body = await self._classify(http, self.new_id("reference"), png, str(depth))
            if status != 200:
                raise RuntimeError(f"the idle server answered {status} to a good image: {body}")
            self.truth[(i, depth)] = body["predictions"][0]["index"]

    async def run(self, seconds: float, workers: int, burst_every_s: float) -> None:
        """`workers` clients sending a random mix until `seconds` pass, and a burst every `burst_every_s`."""
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            grpc = grpc_client.InferenceServerClient(self.grpc_url)
            try:
                tasks = [self._worker(http, grpc, deadline) for _ in range(workers)]
                await asyncio.gather(*tasks, self._bursts(http, deadline, burst_every_s))
            finally:
                await grpc.close()

    async def _worker(self, http, grpc, deadline: float) -> None:
        kinds = [self.good_classify, self.good_v2_http, self.good_v2_grpc, self.hostile_http, self.hostile_grpc,
                 self.hang_up_http, self.cancel_grpc]  # fmt: skip
        weights = [30, 15, 15, 12, 6, 6, 6]
        while time.monotonic() < deadline:
            await self.rng.choices(kinds, weights)[0](http, grpc)

    async def _bursts(self, http, deadline: float, every_s: float) -> None:
        while time.monotonic() + every_s < deadline:
            await asyncio.sleep(every_s)
            await asyncio.gather(*(self.good_classify(http, None, depth="4") for _ in range(BURST)))

    def _image(self) -> tuple[int, bytes]:
        i = self.rng.randrange(len(self.pngs))
        return i, self.pngs[i]

    def _check(self, rid: str, image: int, depth_used: int, top: int) -> None:
        if self.truth[(image, depth_used)] != top:
            self.ledger.wrong.append(f"{rid}: image {image} at depth {depth_used} answered class {top}, "
                                     f"idle answer {self.truth[(image, depth_used)]}")  # fmt: skip

    async def good_classify(self, http, grpc, depth: str | None = None) -> None:
        rid, (i, png) = self.new_id("good classify"), self._image()
        status, body = await self._classify(http, rid, png, depth or self.rng.choice(DEPTH_CHOICES))
        self.ledger.record(rid, "classify", status, _good_status(status, body))
        if status == 200:
            self._check(rid, i, body["depth_used"], body["predictions"][0]["index"])

    async def _classify(self, http, rid: str, png: bytes, depth: str) -> tuple[int, dict]:
        headers = {"Content-Type": "image/png", "X-Request-ID": rid}
        async with http.post(f"{self.url}/classify", data=png, headers=headers, params={"depth": depth}) as r:
            return r.status, await r.json()

    async def good_v2_http(self, http, grpc) -> None:
        rid, (i, png), depth = self.new_id("good v2 http"), self._image(), self.rng.choice(DEPTH_CHOICES)
        top1 = [{"name": "logits", "parameters": {"classification": 1}}]
        headers, data = hostile.v2_bytes_request(png, id=rid, parameters=_depth_parameter(depth), outputs=top1)
        headers["X-Request-ID"] = rid
        async with http.post(f"{self.url}/v2/models/{self.model}/infer", data=data, headers=headers) as r:
            status, body = r.status, await r.json()
        self.ledger.record(rid, "v2_http", status, _good_status(status, body))
        if status == 200:
            top = int(body["outputs"][0]["data"][0].split(":")[1])  # "value:index:label"
            self._check(rid, i, body["parameters"]["depth_used"], top)

    async def good_v2_grpc(self, http, grpc) -> None:
        rid, (i, png), depth = self.new_id("good v2 grpc"), self._image(), self.rng.choice(DEPTH_CHOICES)
        try:
            result = await self._grpc_infer(grpc, rid, png, depth)
        except InferenceServerException as e:
            self.ledger.record(rid, "v2_grpc", e.status(), e.status() == "StatusCode.RESOURCE_EXHAUSTED")
            return
        self.ledger.record(rid, "v2_grpc", "OK", True)
        top = int(result.as_numpy("logits")[0][0].decode().split(":")[1])
        self._check(rid, i, result.get_response().parameters["depth_used"].int64_param, top)

    async def _grpc_infer(self, grpc, rid: str, data: bytes, depth: str, model: str | None = None):
        tensor = grpc_client.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        output = grpc_client.InferRequestedOutput("logits", class_count=1)
        return await grpc.infer(model or self.model, [tensor], outputs=[output], request_id=rid,
                                parameters=_depth_parameter(depth))  # fmt: skip

    async def hostile_http(self, http, grpc) -> None:
        probe = self.rng.choice(self.probes)
        rid = self.new_id(f"hostile: {probe.name}")
        answer = await probe.send(self.host, self.port, rid)
        self.ledger.record(rid, "hostile_http", answer.status, probe.allows(answer.status))

    async def hostile_grpc(self, http, grpc) -> None:
        """Bytes that are no image (INVALID_ARGUMENT), or a model that is not served (NOT_FOUND)."""
        unknown = self.rng.random() < 0.5
        rid = self.new_id("hostile grpc: unknown model" if unknown else "hostile grpc: not an image")
        expected = "StatusCode.NOT_FOUND" if unknown else "StatusCode.INVALID_ARGUMENT"
        try:
            await self._grpc_infer(grpc, rid, b"not an image", "1", "no_such_model" if unknown else None)
            status = "OK"
        except InferenceServerException as e:
            status = e.status()
        self.ledger.record(rid, "hostile_grpc", status, status in (expected, "StatusCode.RESOURCE_EXHAUSTED"))

    async def hang_up_http(self, http, grpc) -> None:
        """A whole request at the deepest depth, then the connection closed a few ms later without reading."""
        rid, (_, png) = self.new_id("hang up http"), self._image()
        headers = {"Content-Type": "image/png", "X-Request-ID": rid}
        await hostile.hang_up_after_sending(self.host, self.port, "/classify?depth=4", headers, png,
                                            self.rng.uniform(0, 0.02))  # fmt: skip

    async def cancel_grpc(self, http, grpc) -> None:
        rid, (_, png) = self.new_id("cancel grpc"), self._image()
        call = asyncio.ensure_future(self._grpc_infer(grpc, rid, png, "4"))
        await asyncio.sleep(self.rng.uniform(0.002, 0.03))
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, InferenceServerException):
            await call


def _depth_parameter(depth: str) -> dict:
    """The V2 `depth` parameter: an integer, or "auto"."""
    return {"depth": depth if depth == "auto" else int(depth)}


def _good_status(status: int, body: dict) -> bool:
    return status == 200 or (status, body.get("code")) in ALLOWED_5XX


def server_ledger(log: Path) -> dict[str, list[int]]:
    """The statuses the server logged per request id (its JSON request lines): one each, if all is well."""
    statuses: dict[str, list[int]] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("logger") == "service.requests":
                statuses.setdefault(entry["request_id"], []).append(entry["status"])
    return statuses


def lost(sent: dict[str, str], logged: dict[str, list[int]]) -> list[str]:
    """Requests the server did not answer exactly once. A gRPC call cancelled within 30 ms may never have
    reached the server (the client gave it up before sending, or before the server read it): none is owed, but
    never two."""
    return sorted(rid for rid, kind in sent.items()
                  if len(logged.get(rid, [])) != 1 and not (kind == "cancel grpc" and rid not in logged))  # fmt: skip


def run_soak_against(url: str, grpc_url: str, pid: int, log: Path, model: str, seconds: float, *, workers: int = 16,
                     burst_every_s: float = 15.0, seed: int = 0, images: int = 64) -> dict:  # fmt: skip
    """The soak against a running server (process `pid` on this machine, its JSON log at `log`): the report."""
    parts = urlsplit(url)
    soak = Soak(parts.hostname, parts.port, grpc_url, model, load_pngs(FASHION_MNIST_DIR, images)[0], seed=seed)
    t0 = time.monotonic()

    segments = max(6, round(seconds / 30))

    async def segment(length_s: float) -> None:  # with a burst at least once in each
        await soak.run(length_s, workers, min(burst_every_s, length_s / 2))

    async def quiet_sample() -> Sample:
        await asyncio.sleep(QUIET_S)  # every hung-up and cancelled request has ended, bodies are freed
        return sample(pid, t0)

    async def phases() -> list[Sample]:
        async with aiohttp.ClientSession() as http:
            await soak.learn_truth(http)
        await segment(min(10.0, seconds / 6))  # warm-up: every path once, the allocators at their working size
        quiet = [await quiet_sample()]
        for _ in range(segments):
            await segment(seconds / segments)
            quiet.append(await quiet_sample())
        return quiet

    quiet = asyncio.run(phases())
    return report(soak, server_ledger(log), quiet, seconds)


def report(soak: Soak, logged: dict[str, list[int]], quiet: list[Sample], seconds: float) -> dict:
    """`quiet`: the server's process between segments of traffic, when no request is in progress; memory
    sampled mid-traffic swings by tens of MiB with the bodies in flight, which would hide a leak's slope."""
    start, end = quiet[0], quiet[-1]
    sent = soak.ledger.sent
    missing = lost(sent, logged)
    server_statuses = Counter(f"{kind} {status}" for rid, kind in sent.items() for status in logged.get(rid, []))
    by_kind = Counter(sent.values())
    by_protocol = Counter()
    for (protocol, _status), n in soak.ledger.answers.items():
        by_protocol[protocol] += n
    rss_slope = slope_mib_per_min(quiet)
    checks = {
        "every request answered exactly once": not missing,
        "every good answer right": not soak.ledger.wrong,
        "no answer outside the contract (no 5xx but overloaded)": not soak.ledger.unexpected,
        "RSS slope < 1 MiB/min": rss_slope < 1.0,
        "no growth in open file descriptors": end.fds <= start.fds,
        "no growth in threads": end.threads <= start.threads,
    }
    return {
        "seconds": seconds,
        "requests": len(sent),
        "requests_by_kind": dict(by_kind),
        "answers_seen_by_client": dict(by_protocol),
        "answers_by_status": {f"{p} {s}": n for (p, s), n in sorted(soak.ledger.answers.items())},
        "lost": missing[:20],
        "lost_by_kind": dict(Counter(sent[rid] for rid in missing)),
        "lost_count": len(missing),
        "never_reached_server": dict(Counter(kind for rid, kind in sent.items() if rid not in logged)),
        "server_answers_by_kind_and_status": dict(sorted(server_statuses.items())),
        "wrong": soak.ledger.wrong[:20],
        "unexpected": soak.ledger.unexpected[:20],
        "rss_mib": {"start": start.rss_mib, "end": end.rss_mib, "slope_per_min": rss_slope},
        "fds": {"start": start.fds, "end": end.fds},
        "threads": {"start": start.threads, "end": end.threads},
        "quiet_samples": [vars(s) for s in quiet],
        "checks": checks,
        "passed": all(checks.values()),
    }


def summary(r: dict) -> str:
    lines = [f"{r['requests']} requests in {r['seconds']:.0f} s: lost {r['lost_count']}, wrong {len(r['wrong'])}, "
             f"outside the contract {len(r['unexpected'])}"]  # fmt: skip
    lines.append("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(r["requests_by_kind"].items())))
    lines.append("answers: " + ", ".join(f"{k} {n}" for k, n in r["answers_by_status"].items()))
    rss, fds, threads = r["rss_mib"], r["fds"], r["threads"]
    lines.append(f"RSS {rss['start']:.1f} -> {rss['end']:.1f} MiB (slope {rss['slope_per_min']:+.2f} MiB/min); "
                 f"fds {fds['start']} -> {fds['end']}; threads {threads['start']} -> {threads['end']}")  # fmt: skip
    lines += [f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in r["checks"].items()]
    lines += [f"  {item}" for item in r["lost"] + r["wrong"] + r["unexpected"]]
    return "\n".join(lines)


def run_soak(args: argparse.Namespace) -> int:
    """`srvit bench soak`: start a server (JSON logs, gRPC on), soak it for --minutes, print and save the report."""
    env = {"SRVIT_LOG_FORMAT": "json"} | dict(item.split("=", 1) for item in args.env)
    with served(args.repo, env, ready_timeout_s=300, grpc=True) as server:
        model = args.model or served_model(server.url, None)["name"]
        r = run_soak_against(server.url, f"127.0.0.1:{server.grpc_port}", server.process.pid, server.log, model,
                             args.minutes * 60, workers=args.workers, seed=args.seed)  # fmt: skip
    print(summary(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0 if r["passed"] else 1
