"""What `srvit export` shows: a progress bar with one line per finished step, then a summary table."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table


class Steps:
    """Progress over the export's steps; silent without a console, as in library use and tests."""

    def __init__(self, console: Console | None, total: int):
        self.console = console
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        self.progress = Progress(
            *columns, TimeElapsedColumn(), console=console, disable=console is None, transient=True
        )
        self.task = self.progress.add_task("export", total=total)

    def __enter__(self) -> Steps:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.progress.update(self.task, description=label)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.note(f"[red]✗[/] {label}")
            raise
        self.note(f"[green]✓[/] {label} [dim]({time.perf_counter() - t0:.1f} s)[/]")
        self.progress.advance(self.task)

    def skip(self, label: str) -> None:
        """A step that had nothing to do: noted, and counted as done."""
        self.note(f"[yellow]-[/] {label}")
        self.progress.advance(self.task)

    def note(self, text) -> None:
        """A line of text, or any rich renderable (a table)."""
        if self.console is not None:
            self.progress.console.print(text)


def summary_table(rows: list[dict]) -> Table:
    """Parity is max |Δlogit| against the reference and top-1 agreement; accuracy is top-1 on held-out data."""
    table = Table(title="exported")
    table.add_column("depth", justify="right")
    table.add_column("file", overflow="fold")
    for column in ("size", "parity", "accuracy", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        accuracy = "—" if r["accuracy"] is None else f"{r['accuracy']:.2%}"
        parity = f"{r['max_abs_diff']:.1e} / {r['top1_agreement']:.1%}"
        table.add_row(str(r["depth"]), r["file"], _size(r["size_bytes"]), parity, accuracy, f"{r['seconds']:.1f} s")
    return table


def calibration_tables(result, flops: dict[int, int]) -> list[Table]:
    """Per depth: cost, temperature and expected calibration error; then the candidate policies' frontier on the
    fit half, with the same policies' figures on the check half, the chosen one marked."""
    per_depth = Table(title="calibration (ECE: expected calibration error, fit half / check half)")
    for column in ("depth", "GFLOPs", "temperature", "ECE before", "ECE after"):
        per_depth.add_column(column, justify="right")
    for depth, r in result.calibration.items():
        before, after = r["ece_before"], r["ece_after"]
        ece = [f"{e['fit']:.4f} / {e['check']:.4f}" for e in (before, after)]
        per_depth.add_row(str(depth), f"{flops[depth] / 1e9:.4f}", f"{r['temperature']:.3f}", *ece)
    frontier = Table(title="adaptive policies: top-1 and compute (fraction of the deepest depth's FLOPs)")
    for column in (
        "",
        "stages (depth@threshold)",
        "answer",
        "fit top-1",
        "fit compute",
        "check top-1",
        "check compute",
    ):
        frontier.add_column(column, justify="right")
    chosen = (result.policy.stages, result.policy.combine) if result.policy is not None else None
    for c in result.frontier:
        stages = " → ".join(f"{s.depth}" + ("" if s.threshold is None else f"@{s.threshold:.2f}")
                            for s in c.policy.stages)  # fmt: skip
        mark = "chosen" if (c.policy.stages, c.policy.combine) == chosen else ""
        frontier.add_row(mark, stages, c.policy.combine, f"{c.fit['top1']:.2%}",
                         f"{c.fit['compute']:.3f}", f"{c.check['top1']:.2%}", f"{c.check['compute']:.3f}")  # fmt: skip
    return [per_depth, frontier]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
