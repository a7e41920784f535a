"""`srvit bench peers`' report: the Markdown (`<tag>.md`) and the plots (`<tag>-<name>.png`) of the JSON it collects.

Every figure and every target's verdict is computed here from the runs, never written in: a run that misses a
target says so. Whatever a run did not measure (a quick run: one placement, no model-bound workload, no tuning, no
model level) is left out rather than shown empty. Values may be null where the JSON had NaN (no answers).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from bench.peer_bench import FASHION, PINNED, SMALL

SRVIT = "srvit"
HEADLINE_CONCURRENCY = (1, 32)  # the cells every round repeats
REFUSED = ("503", "429")  # the statuses that mean "overloaded, try later" rather than a failure
# The targets the peer benchmark checks; the model level's own live in bench.model_level.TARGETS.
OVER_BEST_PEER = 1.3  # fashion, pinned, c=32: srvit's images/s over the best peer's
C1_P50_SLACK_MS = 0.3  # c=1: srvit's p50 at most this far above the lowest peer p50
SMALL_OVER_BEST_PEER = 0.97  # model-bound: srvit's images/s over the best peer's, every depth
SERVER_OVER_RAW = 0.9  # model-bound: srvit's images/s over ONNX Runtime alone at the batch srvit formed
ANSWERED_WITHIN = 0.99  # overload: srvit `auto`'s requests answered within the latency target
SRVIT_COLOR = "#d62728"
PEER_COLORS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f", "#8c564b", "#17becf", "#bcbd22")
FIGSIZE, DPI = (9, 5.5), 100  # 900 x 550 px
PLAIN = LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))  # 20, 50, 100 on a log axis, not 2x10^1


# -- reading the runs ---------------------------------------------------------------------------------


def num(value) -> float:
    """A number from the JSON: null (NaN when it was written) as NaN."""
    return math.nan if value is None else float(value)


def rate(row: dict | None) -> float:
    return math.nan if row is None else num(row.get("images_per_s"))


def lat(row: dict | None, key: str) -> float:
    return math.nan if row is None else num(row["latency_ms"].get(key))


def med(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def closed(report: dict, **match) -> list[dict]:
    return select(report.get("runs") or [], kind="closed", **match)


def cell(rows: list[dict], **match) -> dict | None:
    found = select(rows, **match)
    return found[0] if found else None


def servers(report: dict) -> list[str]:
    """srvit first, then the peers in the order the harness ran them."""
    names = dict.fromkeys([*(report.get("servers") or {}), *(r["server"] for r in report.get("runs") or [])])
    return sorted(names, key=lambda name: name != SRVIT)


def peers(report: dict) -> list[str]:
    return [name for name in servers(report) if name != SRVIT]


def placements(report: dict) -> list[str]:
    return list(dict.fromkeys(r["placement"] for r in report.get("runs") or []))


def max_depth(report: dict, workload: str) -> str | None:
    depths = [int(r["depth"]) for r in select(report.get("runs") or [], workload=workload) if r["depth"].isdigit()]
    return str(max(depths)) if depths else None


def concurrencies(rows: list[dict]) -> list[int]:
    return sorted({r["concurrency"] for r in rows})


def frontier_concurrency(rows: list[dict]) -> int:
    """The highest concurrency at which srvit ran most depths: the frontier's other end (the max depth alone
    also runs at higher ones)."""
    counts = {c: len({r["depth"] for r in rows if r["concurrency"] == c}) for c in concurrencies(rows)}
    return max(counts, key=lambda c: (counts[c], c))


def frontier_depths(rows: list[dict]) -> list[str]:
    """Numeric depths ascending, then `auto` and `adaptive`."""
    depths = {r["depth"] for r in rows}
    return sorted((d for d in depths if d.isdigit()), key=int) + [d for d in ("auto", "adaptive") if d in depths]


def top1(report: dict, workload: str, row: dict) -> float:
    """Top-1 of what a run answered with: the depth's own (a peer's too), `auto` weighted by the depths its
    answers used, `adaptive` the policy's expected top-1 from the export."""
    table = (report.get("top1") or {}).get(workload) or {}
    if row["depth"] != "auto":
        return num(table.get(row["depth"]))
    mix = row.get("depth_mix") or {}
    return sum(share * num(table.get(depth)) for depth, share in mix.items()) if mix else math.nan


# -- the headline cells -------------------------------------------------------------------------------


def headline(report: dict) -> dict[str, dict[str, list[float]]]:
    """Per server, fashion, pinned, max depth, one value per round: c=32 images/s and p99, c=1 p50 and images/s."""
    rows = closed(report, workload=FASHION, placement="pinned", depth=max_depth(report, FASHION))
    low, high = HEADLINE_CONCURRENCY
    cells = {}
    for server in servers(report):
        lo, hi = select(rows, server=server, concurrency=low), select(rows, server=server, concurrency=high)
        if lo or hi:
            cells[server] = {"rate": [rate(r) for r in hi], "p99": [lat(r, "p99") for r in hi],
                             "p50": [lat(r, "p50") for r in lo], "rate1": [rate(r) for r in lo]}  # fmt: skip
    return cells


@dataclass(frozen=True)
class Comparison:
    """srvit against the peer with the highest median c=32 images/s (`best`) and the one with the lowest median
    c=1 p50 (`fastest`)."""

    best: str
    fastest: str
    ratio: float  # srvit's median c=32 images/s over best's
    p50_diff_ms: float  # srvit's median c=1 p50 minus fastest's


def compare(cells: dict[str, dict[str, list[float]]]) -> Comparison | None:
    others = [name for name in cells if name != SRVIT]
    if SRVIT not in cells or not others:
        return None
    best = max(others, key=lambda n: finite_or(med(cells[n]["rate"]), -math.inf))
    fastest = min(others, key=lambda n: finite_or(med(cells[n]["p50"]), math.inf))
    srvit = cells[SRVIT]
    return Comparison(best, fastest, ratio(med(srvit["rate"]), med(cells[best]["rate"])),
                      med(srvit["p50"]) - med(cells[fastest]["p50"]))  # fmt: skip


def best_peer_row(rows: list[dict]) -> dict | None:
    """The peer row with the highest images/s among `rows`."""
    theirs = [r for r in rows if r["server"] != SRVIT]
    return max(theirs, key=lambda r: finite_or(rate(r), -math.inf)) if theirs else None


# -- targets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    target: str
    met: bool | None  # None: not measured in this run
    figures: str


def targets(report: dict) -> list[Verdict]:
    return [throughput_target(report), everywhere_target(report), *c1_targets(report), *small_targets(report),
            overload_target(report), model_level_target(report)]  # fmt: skip


def throughput_target(report: dict) -> Verdict:
    name = f"fashion, pinned, c=32: srvit >= {OVER_BEST_PEER}x the best peer's images/s and a lower p99"
    cells = headline(report)
    c = compare(cells)
    if c is None:
        return Verdict(name, None, "no srvit and peer cells")
    s, b = cells[SRVIT], cells[c.best]
    met = c.ratio >= OVER_BEST_PEER and med(s["p99"]) < finite_or(med(b["p99"]), math.inf)
    return Verdict(name, met, f"{fmt(c.ratio, 2)}x {c.best} ({fmt(med(s['rate']))} vs {fmt(med(b['rate']))} "
                              f"images/s); p99 {ms(med(s['p99']))} vs {ms(med(b['p99']))} ms")  # fmt: skip


def everywhere_target(report: dict) -> Verdict:
    name = "fashion, every placement and concurrency (round 1): srvit ahead of every peer"
    margins = []  # (srvit over the best peer, that peer, placement, concurrency)
    for placement in placements(report):
        rows = closed(report, workload=FASHION, placement=placement, round=1, depth=max_depth(report, FASHION))
        for concurrency in concurrencies(select(rows, server=SRVIT)):
            at = select(rows, concurrency=concurrency)
            best = best_peer_row(at)
            if best is not None:
                margin = ratio(rate(cell(at, server=SRVIT)), rate(best))
                margins.append((margin, best["server"], placement, concurrency))
    if not margins:
        return Verdict(name, None, "no srvit and peer cells")
    ahead = sum(m[0] > 1 for m in margins)
    worst = min(margins, key=lambda m: finite_or(m[0], -math.inf))
    return Verdict(name, ahead == len(margins), f"ahead in {ahead}/{len(margins)} cells; closest {fmt(worst[0], 2)}x "
                                                f"{worst[1]} at c={worst[3]}, {worst[2]}")  # fmt: skip


def c1_targets(report: dict) -> list[Verdict]:
    names = (f"fashion, pinned, c=1: srvit's p50 within {C1_P50_SLACK_MS} ms of the best peer's",
             "fashion, pinned, c=1: srvit the highest images/s")  # fmt: skip
    cells = headline(report)
    c = compare(cells)
    if c is None:
        return [Verdict(name, None, "no srvit and peer cells") for name in names]
    s, fastest = cells[SRVIT], cells[c.fastest]
    p50 = Verdict(names[0], c.p50_diff_ms <= C1_P50_SLACK_MS, f"srvit {ms(med(s['p50']))} ms, {c.fastest} "
                  f"{ms(med(fastest['p50']))} ms: {c.p50_diff_ms:+.2f} ms")  # fmt: skip
    top = max(cells, key=lambda n: finite_or(med(cells[n]["rate1"]), -math.inf))
    runner = max((n for n in cells if n != SRVIT), key=lambda n: finite_or(med(cells[n]["rate1"]), -math.inf))
    throughput = Verdict(names[1], top == SRVIT, f"srvit {fmt(med(s['rate1']))} images/s, best peer {runner} "
                         f"{fmt(med(cells[runner]['rate1']))}")  # fmt: skip
    return [p50, throughput]


def small_cells(report: dict) -> tuple[int | None, list[str], list[dict]]:
    """The model-bound workload's highest concurrency, its depths and its rows (pinned, round 1)."""
    rows = closed(report, workload=SMALL, placement="pinned", round=1)
    depths = sorted({r["depth"] for r in rows if r["depth"].isdigit()}, key=int)
    return (max(concurrencies(rows)) if rows else None), depths, rows


def small_targets(report: dict) -> list[Verdict]:
    high, depths, rows = small_cells(report)
    names = (f"model-bound, every depth: srvit >= {SMALL_OVER_BEST_PEER}x the best peer's images/s",
             "model-bound, every depth: srvit's p99 no worse than that peer's",
             f"model-bound, every depth: srvit / ONNX Runtime alone >= {SERVER_OVER_RAW}")  # fmt: skip
    pairs = [(d, cell(rows, server=SRVIT, depth=d, concurrency=high),
              best_peer_row(select(rows, depth=d, concurrency=high))) for d in depths]  # fmt: skip
    pairs = [(d, s, b) for d, s, b in pairs if s is not None and b is not None]
    raw = [r for r in report.get("raw") or [] if r.get("workload", SMALL) == SMALL]
    verdicts = [Verdict(name, None, "no srvit and peer cells") for name in names[:2]]
    if pairs:
        ratios = {d: ratio(rate(s), rate(b)) for d, s, b in pairs}
        verdicts = [
            Verdict(names[0], all(r >= SMALL_OVER_BEST_PEER for r in ratios.values()),
                    f"c={high}: " + ", ".join(f"d{d} {fmt(ratios[d], 2)}x {b['server']}" for d, _, b in pairs)),
            Verdict(names[1], all(lat(s, "p99") <= finite_or(lat(b, "p99"), math.inf) for _, s, b in pairs),
                    ", ".join(f"d{d} {ms(lat(s, 'p99'))} vs {ms(lat(b, 'p99'))} ms" for d, s, b in pairs)),
        ]  # fmt: skip
    if not raw:
        return [*verdicts, Verdict(names[2], None, "ONNX Runtime alone not measured")]
    met = all(num(r["server_over_raw"]) >= SERVER_OVER_RAW for r in raw)
    figures = ", ".join(f"d{r['depth']} {fmt(num(r['server_over_raw']), 2)} (batch {r['batch']})" for r in raw)
    return [*verdicts, Verdict(names[2], met, figures)]


def overload_rows(report: dict) -> list[dict]:
    return select(report.get("runs") or [], kind="overload", round=1)


def overload_target(report: dict) -> Verdict:
    target_ms = report.get("latency_target_ms")
    name = f"overload: srvit `auto` answers >= {ANSWERED_WITHIN:.0%} within the latency target ({fmt(target_ms, 0)} ms)"
    rows = overload_rows(report)
    auto = [r for r in select(rows, server=SRVIT, depth="auto") if r.get("answered_within") is not None]
    if not auto:
        return Verdict(name, None, "no overload run of srvit auto with answered-within recorded")
    met = all(num(r.get("answered_within")) >= ANSWERED_WITHIN for r in auto)
    mine = [f"{short(r['workload'])} {r['placement']}: {pct(num(r.get('answered_within')))}" for r in auto]
    theirs = [f"{r['server']} {ms(lat(r, 'p99'))} ms" for r in select(rows, workload=FASHION, placement="pinned")
              if r["server"] != SRVIT]  # fmt: skip
    return Verdict(
        name, met, "; ".join(mine) + ("; peers' p99 (fashion, pinned): " + ", ".join(theirs) if theirs else "")
    )


def model_level_target(report: dict) -> Verdict:
    """bench.model_level's own verdicts (its TARGETS, judged by its `targets`), over both workloads."""
    try:
        from bench.model_level import TARGETS
        from bench.model_level import targets as judge
    except ImportError:
        return Verdict("model level", None, "bench.model_level not there")
    wanted = ", ".join(f">= {target}x at batch {batch}" for batch, target in TARGETS.items())
    name = f"model level: ONNX Runtime over PyTorch eager {wanted}, every depth, both models"
    results = report.get("model_level") or {}
    judged = [(workload, t) for workload, r in results.items() for t in judge(r)]
    missing = [short(w) for w in (FASHION, SMALL) if w not in results]
    met = all_met([t["met"] for _, t in judged] + [None] * len(missing))
    figures = [f"{short(w)} batch {t['batch']}: lowest {fmt(min(t['ratios'].values(), default=None), 2)}x"
               for w, t in judged]  # fmt: skip
    return Verdict(name, met, "; ".join(figures + [f"{w} not measured" for w in missing]))


def all_met(verdicts: list[bool | None]) -> bool | None:
    """Missed if any is missed; otherwise not measured if any is (or there is none)."""
    if False in verdicts:
        return False
    return None if None in verdicts or not verdicts else True


# -- formatting ---------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def ms(value: float) -> str:
    """Milliseconds: two decimals below 10 ms, where a tenth of a millisecond matters."""
    return fmt(value, 2 if math.isfinite(value) and abs(value) < 10 else 1)


def pct(fraction: float) -> str:
    return "-" if not math.isfinite(fraction) else f"{fraction:.1%}"


def spread(values: list[float], show=fmt) -> str:
    """Median (min-max) over rounds; one value alone."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return show(med(values))
    return f"{show(med(finite))} ({show(min(finite))}-{show(max(finite))})"


def errors(counts: dict) -> str:
    return " ".join(f"{status}:{n}" for status, n in counts.items()) or "0"


def mix(shares: dict) -> str:
    return " ".join(f"d{d}:{share:.0%}" for d, share in shares.items())


def short(workload: str) -> str:
    return {FASHION: "fashion", SMALL: "small"}.get(workload, workload)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def image(plots: dict[str, str], name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({plots[name]})"] if name in plots else []


def cores(cpus: set[int]) -> str:
    return ("core " if len(cpus) == 1 else "cores ") + ",".join(map(str, sorted(cpus)))


# -- the Markdown -------------------------------------------------------------------------------------


def markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    """The report; `plots` maps a plot's name to the file the Markdown links (relative to it)."""
    plots = plots or {}
    sections = [machine_section(report), targets_section(report), servers_section(report),
                headline_section(report, plots), closed_section(report, plots), frontier_section(report, plots),
                overload_section(report, plots), wrk_section(report), small_section(report, plots),
                model_level_section(report)]  # fmt: skip
    title = f"# Peer benchmark: srvit against {', '.join(peers(report)) or 'no peer'}"
    return "\n\n".join(["\n".join(s) for s in [[title], *sections] if s]) + "\n"


def machine_section(report: dict) -> list[str]:
    m, plan = report.get("machine") or {}, report.get("plan") or {}
    commit = (m.get("git_commit") or "unknown")[:12]
    lines = ["## Machine and setup", "",
             f"{m.get('cpu', 'unknown CPU')}, {m.get('logical_cpus', '?')} logical CPUs ({m.get('cpus_usable', '?')} "
             f"usable), ONNX Runtime {m.get('onnxruntime', '?')}, Python {m.get('python', '?')}, {m.get('date', '?')}, "
             f"commit {commit}.", ""]  # fmt: skip
    where = {"pinned": f"every server on {cores(PINNED['server'])}, the load generator and wrk on "
                       f"{cores(PINNED['client'])}",
             "shared": "server and load generator on every CPU"}  # fmt: skip
    for placement in plan.get("placements") or placements(report):
        lines.append(f"- {placement}: {where.get(placement, 'as recorded')}.")
    if plan:
        lines += [f"- Every cell: {plan['warmup_s']:g} s warm-up, then {plan['duration_s']:g} s measured; closed "
                  f"loop at concurrency {', '.join(map(str, plan['concurrency']))}. The headline cells (fashion, "
                  f"pinned, c=1 and c=32, max depth) in {plan['rounds']} round(s), servers in a rotated order.",
                  f"- Overload: open loop at {plan['overload']:g}x each server's own highest closed-loop "
                  "images/s."]  # fmt: skip
    if report.get("latency_target_ms") is not None:
        lines.append(f"- srvit's latency target (`auto`, `adaptive`, answered-within): "
                     f"{report['latency_target_ms']:g} ms.")  # fmt: skip
    lines.append("- Load generator: aiohttp, one process. Closed loop: N workers, each sending its next request when "
                 "the last is answered; requests finished inside the measured window count. Open loop: requests "
                 "evenly spaced at the rate, latency from when each was due, so a server that falls behind cannot "
                 "hide its queue. Percentiles over answered (200) requests.")  # fmt: skip
    return lines


def targets_section(report: dict) -> list[str]:
    status = {True: "**met**", False: "**missed**", None: "not measured"}
    rows = [[v.target, status[v.met], v.figures] for v in targets(report)]
    return ["## Targets", "", *table(["target", "status", "figures"], rows)]


def servers_section(report: dict) -> list[str]:
    known = report.get("servers") or {}
    if not known:
        return []
    rows = []
    for name, s in known.items():
        config = s.get("config") or {}
        if name == SRVIT:
            env = ", ".join(f"{k}={v}" for k, v in config.items())
            rows.append([name, "srvit", str(s.get("version", "?"))[:12], "defaults at this commit" +
                         (f", {env}" if env else ""), "srvit serve"])  # fmt: skip
        else:
            setting = (f"max batch {config['max_batch']}, batch wait {config['max_delay_ms']:g} ms"
                       if config else "-")  # fmt: skip
            rows.append([name, s.get("package", "?"), s.get("version", "?"), setting, f"`{s.get('module', '?')}`"])
    lines = ["## Servers", "", *table(["server", "package", "version", "configuration", "served by"], rows)]
    return lines + tuning_lines(report)


def tuning_lines(report: dict) -> list[str]:
    tried = report.get("tuning") or []
    if not tried:
        return []
    chosen = {n: (s.get("config") or {}).get("max_delay_ms") for n, s in (report.get("servers") or {}).items()}
    rows = [[r["server"], f"{r['max_delay_ms']:g}", fmt(rate(r)), ms(lat(r, "p99")),
             "**chosen**" if r["max_delay_ms"] == chosen.get(r["server"]) else ""] for r in tried]  # fmt: skip
    return ["", "Batch wait tried per peer (fashion, pinned, max depth, c=32); the highest images/s, then the lowest "
            "p99, is the configuration every later cell used:", "",
            *table(["server", "batch wait ms", "images/s", "p99 ms", ""], rows)]  # fmt: skip


def headline_section(report: dict, plots: dict[str, str]) -> list[str]:
    cells = headline(report)
    if not cells:
        return []
    rounds = max(len(c["rate"]) for c in cells.values())
    rows = [[name, spread(c["rate"]), ms(med(c["p99"])), spread(c["p50"], ms), spread(c["rate1"])]
            for name, c in cells.items()]  # fmt: skip
    lines = [f"## Headline: fashion, pinned, depth {max_depth(report, FASHION)}", "",
             f"Median over {rounds} round(s), (min-max) where there are several.", "",
             *table(["server", "c=32 images/s", "c=32 p99 ms", "c=1 p50 ms", "c=1 images/s"], rows)]  # fmt: skip
    c = compare(cells)
    if c is not None:
        s = cells[SRVIT]
        lines += ["", f"srvit / best peer ({c.best}) at c=32: **{fmt(c.ratio, 2)}x** ({fmt(med(s['rate']))} vs "
                  f"{fmt(med(cells[c.best]['rate']))} images/s). c=1 p50: srvit {ms(med(s['p50']))} ms, lowest peer "
                  f"({c.fastest}) {ms(med(cells[c.fastest]['p50']))} ms: **{c.p50_diff_ms:+.2f} ms**."]  # fmt: skip
    return lines + image(plots, "latency-cdf", "latency CDF at c=32")


def closed_section(report: dict, plots: dict[str, str]) -> list[str]:
    runs = closed(report, round=1)
    if not runs:
        return []
    lines = ["## Every closed-loop cell", "", "Round 1 only (later rounds repeat the headline cells)."]
    lines += image(plots, "throughput", "images/s against concurrency")
    groups = dict.fromkeys((r["workload"], r["placement"]) for r in runs)
    for workload, placement in groups:
        rows = select(runs, workload=workload, placement=placement)
        order = sorted(rows, key=lambda r: (servers(report).index(r["server"]), frontier_depths(rows).index(
            r["depth"]), r["concurrency"]))  # fmt: skip
        body = [[r["server"], r["depth"], str(r["concurrency"]), fmt(rate(r)), ms(lat(r, "p50")), ms(lat(r, "p95")),
                 ms(lat(r, "p99")), fmt(r.get("mean_batch")), errors(r["errors"])] for r in order]  # fmt: skip
        head = ["server", "depth", "concurrency", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors"]
        lines += ["", f"### {workload}, {placement}", "", *table(head, body)]
    return lines


def frontier_section(report: dict, plots: dict[str, str]) -> list[str]:
    rows = closed(report, workload=FASHION, placement="pinned", round=1, server=SRVIT)
    if len(frontier_depths(rows)) < 2:
        return []
    high = frontier_concurrency(rows)
    body = []
    for depth in frontier_depths(rows):
        lo, hi = cell(rows, depth=depth, concurrency=1), cell(rows, depth=depth, concurrency=high)
        body.append([depth, ms(lat(lo, "p50")), fmt(top1(report, FASHION, lo) if lo else math.nan, 4),
                     fmt(rate(hi)), ms(lat(hi, "p99")), fmt(top1(report, FASHION, hi) if hi else math.nan, 4),
                     mix(hi.get("depth_mix") or {}) if hi else "-"])  # fmt: skip
    head = ["depth", "c=1 p50 ms", "c=1 top-1", f"c={high} images/s", f"c={high} p99 ms", f"c={high} top-1",
            f"c={high} depth mix"]  # fmt: skip
    return ["## srvit across depths: fashion, pinned", "",
            "Top-1 per depth from the export's test-set measurement; `auto` weighted by the depths its answers "
            "used in that run; `adaptive` the policy's expected top-1 (the export's check half).", "",
            *table(head, body), *image(plots, "frontier", "top-1 against latency and throughput")]  # fmt: skip


def overload_section(report: dict, plots: dict[str, str]) -> list[str]:
    rows = overload_rows(report)
    if not rows:
        return []
    target = fmt(report.get("latency_target_ms"), 0)
    body = []
    for r in rows:
        total = r.get("requests") or 0
        refused = sum(n for status, n in r["errors"].items() if status in REFUSED)
        other = {status: n for status, n in r["errors"].items() if status not in REFUSED}
        body.append([short(r["workload"]), r["placement"], r["server"], r["depth"], fmt(num(r.get("rate"))),
                     fmt(num(r.get("capacity"))), pct(ratio(r["ok"], total)), pct(num(r.get("answered_within"))),
                     str(refused), errors(other), ms(lat(r, "p50")), ms(lat(r, "p95")), ms(lat(r, "p99"))])  # fmt: skip
    head = ["workload", "placement", "server", "depth", "offered req/s", "capacity images/s", "answered",
            f"within {target} ms", "refused (503/429)", "other errors", "p50 ms", "p95 ms", "p99 ms"]  # fmt: skip
    return ["## Overload", "",
            "Open loop at the offered rate, derived from the server's own capacity (its highest closed-loop "
            "images/s). Answered and within-target as a share of every request sent.", "",
            *table(head, body), *image(plots, "overload", "overload: answered within target and p99")]  # fmt: skip


def wrk_section(report: dict) -> list[str]:
    rows = report.get("wrk") or []
    if not rows:
        return []
    body = []
    for w in rows:
        mine = cell(closed(report, round=1), server=w["server"], workload=w["workload"], placement=w["placement"],
                    concurrency=w["concurrency"], depth=w["depth"])  # fmt: skip
        body.append([w["server"], short(w["workload"]), w["placement"], str(w["concurrency"]),
                     fmt(num(w["requests_per_s"])), ms(lat(w, "p50")), ms(lat(w, "p99")),
                     str(w.get("non_2xx", 0) + w.get("socket_errors", 0)), fmt(rate(mine)), ms(lat(mine, "p50")),
                     ms(lat(mine, "p99")), fmt(ratio(num(w["requests_per_s"]), rate(mine)), 2)])  # fmt: skip
    head = ["server", "workload", "placement", "c", "wrk req/s", "wrk p50 ms", "wrk p99 ms", "wrk errors",
            "load generator images/s", "p50 ms", "p99 ms", "wrk / load generator"]  # fmt: skip
    return ["## wrk cross-check", "", "The same cell (round 1) measured by wrk, one image repeated.", "",
            *table(head, body)]  # fmt: skip


def small_section(report: dict, plots: dict[str, str]) -> list[str]:
    high, depths, rows = small_cells(report)
    if not rows:
        return []
    body = [[d, r["server"], fmt(rate(r)), ms(lat(r, "p99")),
             ms(lat(cell(rows, server=r["server"], depth=d, concurrency=1), "p50"))]
            for d in depths for r in select(rows, depth=d, concurrency=high)]  # fmt: skip
    raw = {r["depth"]: r for r in report.get("raw") or [] if r.get("workload", SMALL) == SMALL}
    summary = []
    for d in depths:
        s, b = (
            cell(rows, server=SRVIT, depth=d, concurrency=high),
            best_peer_row(select(rows, depth=d, concurrency=high)),
        )
        r = raw.get(d)
        summary.append([d, fmt(rate(s)), b["server"] if b else "-", fmt(rate(b)), fmt(ratio(rate(s), rate(b)), 2),
                        str(r["batch"]) if r else "-", fmt(num(r["images_per_s"])) if r else "-",
                        fmt(num(r["server_over_raw"]), 2) if r else "-"])  # fmt: skip
    return [f"## Model-bound workload: {SMALL}, pinned", "",
            "Real photographs, 320x240 to 2048x1536 JPEG, decoded and resized by each server. Round 1.", "",
            *table(["depth", "server", f"c={high} images/s", f"c={high} p99 ms", "c=1 p50 ms"], body), "",
            *table(["depth", "srvit images/s", "best peer", "its images/s", "srvit / best peer",
                    "srvit's mean batch", "ONNX Runtime alone images/s", "srvit / ONNX Runtime"], summary),
            *image(plots, "small", "model-bound images/s per depth")]  # fmt: skip


def model_level_section(report: dict) -> list[str]:
    results = report.get("model_level") or {}
    try:
        from bench.model_level import markdown as model_markdown
    except ImportError:
        return []
    if not results:
        return []
    lines = ["## Model level", "", "The model alone, no server: ONNX Runtime against PyTorch eager and torch.compile."]
    for text in (model_markdown(r) for r in results.values()):
        lines += ["", *("##" + line if line.startswith("#") else line for line in text.rstrip().splitlines())]
    return lines


# -- the plots ----------------------------------------------------------------------------------------


def colors(report: dict) -> dict[str, str]:
    """One color per server for every plot of a report; srvit's own."""
    return {SRVIT: SRVIT_COLOR} | {p: PEER_COLORS[i % len(PEER_COLORS)] for i, p in enumerate(peers(report))}


def style(report: dict, server: str) -> dict:
    if server == SRVIT:
        return {"color": SRVIT_COLOR, "linewidth": 2.6, "marker": "o", "zorder": 3, "label": server}
    return {"color": colors(report)[server], "linewidth": 1.4, "marker": "s", "linestyle": "--", "label": server}


def figure(panels: int = 1) -> tuple[Figure, list]:
    """A figure without pyplot: no global state, no backend to choose; savefig renders PNG with Agg."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def throughput_plot(report: dict) -> Figure | None:
    depth = max_depth(report, FASHION)
    rows = closed(report, workload=FASHION, round=1, depth=depth)
    if not rows:
        return None
    fig, axes = figure(len(placements(report)))
    for ax, placement in zip(axes, placements(report), strict=True):
        here = select(rows, placement=placement)
        for server in servers(report):
            mine = sorted(select(here, server=server), key=lambda r: r["concurrency"])
            if mine:
                ax.plot([r["concurrency"] for r in mine], [rate(r) for r in mine], **style(report, server))
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies(here), [str(c) for c in concurrencies(here)])
        ax.set(title=placement, xlabel="concurrency (closed loop)", ylabel="images/s", ylim=(0, None))
        ax.legend()
    fig.suptitle(f"Throughput against concurrency: fashion, depth {depth}, round 1")
    return fig


def latency_cdf_plot(report: dict) -> Figure | None:
    high = HEADLINE_CONCURRENCY[1]
    rows = closed(report, workload=FASHION, placement="pinned", round=1, depth=max_depth(report, FASHION),
                  concurrency=high)  # fmt: skip
    rows = [r for r in rows if r.get("latency_cdf_ms")]
    if not rows:
        return None
    fig, (ax,) = figure()
    for server in servers(report):
        r = cell(rows, server=server)
        if r is not None:
            cdf = [num(v) for v in r["latency_cdf_ms"]]
            ax.step(cdf, range(1, len(cdf) + 1), where="post", **style(report, server) | {"marker": None})
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(PLAIN)
    ax.set(title=f"Latency CDF at c={high}: fashion, pinned, depth {max_depth(report, FASHION)}, round 1",
           xlabel="latency ms (log scale)", ylabel="percentile of answered requests", ylim=(0, 100))  # fmt: skip
    ax.legend()
    return fig


def frontier_plot(report: dict) -> Figure | None:
    rows = closed(report, workload=FASHION, placement="pinned", round=1)
    mine = select(rows, server=SRVIT)
    if not mine or not math.isfinite(top1(report, FASHION, mine[0])):
        return None
    high = frontier_concurrency(mine)
    fig, axes = figure(2)
    for ax, concurrency, x in ((axes[0], 1, lambda r: lat(r, "p50")), (axes[1], high, rate)):
        frontier_panel(report, ax, select(rows, concurrency=concurrency), x)
    axes[0].set(title="top-1 against c=1 p50", xlabel="c=1 p50 ms", ylabel="top-1 (test set)")
    axes[1].set(title=f"top-1 against images/s at c={high}", xlabel=f"images/s at c={high}", ylabel="top-1")
    fig.suptitle("Accuracy against latency and throughput: fashion, pinned, round 1")
    return fig


def frontier_panel(report: dict, ax, rows: list[dict], x: Callable[[dict], float]) -> None:
    """srvit's depths as a line labelled d1..dN, `auto` and `adaptive` with their own markers, peers as points."""
    mine = select(rows, server=SRVIT)
    fixed = sorted((r for r in mine if r["depth"].isdigit()), key=lambda r: int(r["depth"]))
    ax.plot([x(r) for r in fixed], [top1(report, FASHION, r) for r in fixed], **style(report, SRVIT) | {"label":
            "srvit, fixed depth"})  # fmt: skip
    for r in fixed:
        ax.annotate(f"d{r['depth']}", (x(r), top1(report, FASHION, r)), xytext=(5, 5), textcoords="offset points")
    for depth, marker in (("auto", "*"), ("adaptive", "D")):
        for r in select(mine, depth=depth):
            ax.scatter([x(r)], [top1(report, FASHION, r)], marker=marker, s=160 if marker == "*" else 70,
                       color=SRVIT_COLOR, edgecolor="black", zorder=4, label=f"srvit {depth}")  # fmt: skip
    for r in (r for r in rows if r["server"] != SRVIT):
        ax.scatter([x(r)], [top1(report, FASHION, r)], marker="s", s=60, color=colors(report)[r["server"]],
                   zorder=3, label=f"{r['server']} d{r['depth']}")  # fmt: skip
    ax.legend(fontsize="small")


def overload_plot(report: dict) -> Figure | None:
    rows = select(overload_rows(report), workload=FASHION, placement="pinned")
    if not rows:
        return None
    fig, (within, tail) = figure(2)
    x = range(len(rows))
    labels = [f"{r['server']} {'d' + r['depth'] if r['depth'].isdigit() else r['depth']}" for r in rows]
    shades = [colors(report)[r["server"]] for r in rows]
    target = fmt(report.get("latency_target_ms"), 0)
    # Answered at all, pale, behind answered in time: the gap is what came back late.
    within.bar(x, [100 * ratio(r["ok"], r.get("requests") or 0) for r in rows], color=shades, alpha=0.3,
               label="answered (200)")  # fmt: skip
    bars = within.bar(x, [100 * num(r.get("answered_within")) for r in rows], color=shades,
                      label=f"answered within {target} ms")  # fmt: skip
    within.bar_label(bars, fmt="%.1f")
    within.axhline(100 * ANSWERED_WITHIN, color="black", linestyle=":", label=f"target {ANSWERED_WITHIN:.0%}")
    within.set(title=f"answered within {target} ms", ylabel="% of requests sent", ylim=(0, 110))
    within.legend(loc="lower left", fontsize="small")
    tail.bar_label(tail.bar(x, [lat(r, "p99") for r in rows], color=shades), fmt="%.0f")
    tail.set(title="p99 of answered requests", ylabel="ms")
    for ax in (within, tail):
        ax.set_xticks(x, labels, rotation=30, ha="right")
    factors = sorted({num(r.get("overload")) for r in rows})
    fig.suptitle(f"Overload: open loop at {', '.join(f'{v:g}' for v in factors)}x each server's capacity, fashion, "
                 "pinned")  # fmt: skip
    return fig


def small_plot(report: dict) -> Figure | None:
    high, depths, rows = small_cells(report)
    if not rows:
        return None
    fig, (ax,) = figure()
    for server in servers(report):
        mine = [cell(rows, server=server, depth=d, concurrency=high) for d in depths]
        points = [(int(d), rate(r)) for d, r in zip(depths, mine, strict=True) if r is not None]
        if points:
            ax.plot(*zip(*points, strict=True), **style(report, server))
    raw = sorted(
        (r for r in report.get("raw") or [] if r.get("workload", SMALL) == SMALL), key=lambda r: int(r["depth"])
    )
    if raw:
        ax.plot([int(r["depth"]) for r in raw], [num(r["images_per_s"]) for r in raw], color="black", linestyle=":",
                marker="x", label="ONNX Runtime alone, srvit's batch")  # fmt: skip
    ax.set_xticks([int(d) for d in depths])
    ax.set(title=f"Model-bound: {SMALL}, pinned, c={high}", xlabel="depth", ylabel="images/s", ylim=(0, None))
    ax.legend()
    return fig


PLOTS: dict[str, Callable[[dict], Figure | None]] = {
    "throughput": throughput_plot,
    "latency-cdf": latency_cdf_plot,
    "frontier": frontier_plot,
    "overload": overload_plot,
    "small": small_plot,
}


# -- files --------------------------------------------------------------------------------------------


def write_peer_report(report: dict, out: Path, tag: str) -> list[Path]:
    """`<out>/<tag>.md` and every plot the report has data for, `<out>/<tag>-<name>.png`; the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in PLOTS.items():
        fig = plot(report)
        if fig is not None:
            written[name] = out / f"{tag}-{name}.png"
            fig.savefig(written[name])
    md = out / f"{tag}.md"
    md.write_text(markdown(report, {name: path.name for name, path in written.items()}))
    return [md, *written.values()]
