"""What every benchmark shares: interleaved timing, result rows, the table, JSON, memory probes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "outputs" / "bench"
T = TypeVar("T")


@dataclass
class Row:
    """One line of the table: our number, the baseline's, and how many times better ours is.

    ``ratio`` is always oriented so that bigger means "ours is better" for speed rows
    (throughput ours/baseline, or time baseline/ours); memory-growth rows say ``<=``.
    """

    bench: str
    metric: str
    workload: str
    ours: float | None
    baseline: float | None
    unit: str
    ratio: float | None
    target: float | None = None
    direction: Literal[">=", "<="] = ">="
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.direction == ">=" else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def column_map(table: Any, key: str, value: str) -> dict[Any, Any]:
    """``{key: value}`` over the rows of an Arrow table."""
    return dict(zip(table.column(key).to_pylist(), table.column(value).to_pylist(), strict=True))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Timed(Generic[T]):
    seconds: float
    value: T


def timed(fn: Callable[[], T]) -> Timed[T]:
    start = time.perf_counter()
    value = fn()
    return Timed(time.perf_counter() - start, value)


def interleave(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Timed[Any]]]:
    """Run every contender ``rounds`` times, reversing the order each round (A B, B A, A B …).

    Load on a shared machine drifts within seconds; alternating the order spreads that
    drift over both sides instead of charging it to whichever ran second.
    """
    names = list(fns)
    out: dict[str, list[Timed[Any]]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            out[name].append(timed(fns[name]))
    return out


def median_ratio(
    ours: Sequence[Timed[Any]], baseline: Sequence[Timed[Any]], work: Callable[[Any], float] | None = None
) -> float | None:
    """Median over rounds of how many times better ours did than the baseline in the same round.

    With ``work`` (units of work a run did, e.g. tokens), rounds compare throughput; without,
    they compare time on identical work. Pairing runs of the same round before taking the
    median keeps one disturbed round from deciding the result.
    """
    ratios = []
    for a, b in zip(ours, baseline, strict=True):
        if work is None:
            ratios.append(b.seconds / a.seconds)
        else:
            ratios.append((work(a.value) / a.seconds) / (work(b.value) / b.seconds))
    return statistics.median(ratios) if ratios else None


def total_seconds(runs: Sequence[Timed[Any]]) -> float:
    return sum(run.seconds for run in runs)


def machine() -> dict[str, Any]:
    """The machine as the README reports it: cores, memory, CPU model, load when the run began."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": model or platform.processor(),
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set so far.

    Linux's ``VmHWM`` belongs to the current address space, so it starts afresh at exec.
    ``ru_maxrss`` does not: it keeps the high-water mark of the image before exec, which for a
    child of a large parent is the parent's size at fork (a 200k-prompt driver made every
    stage look 800 MiB), so it is only the fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(
    cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run a command and sample the summed RSS of its whole process tree every 50 ms.

    Tools that fan out into worker processes (distilabel does) would look small if only
    the parent's peak were read, so every descendant is counted.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    peak = 0
    root = psutil.Process(proc.pid)
    import threading

    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                members = [root, *root.children(recursive=True)]
                total = 0
                for member in members:
                    with contextlib.suppress(psutil.Error):  # a worker may exit between the two calls
                        total += member.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    finally:
        stop.set()
        sampler.join()
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "peak_tree_rss_mib": peak / 1024**2,
        "stdout": stdout,
        "stderr": stderr,
    }


def parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where <name>.json goes")
    return parser


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(rows: Sequence[Row | dict[str, Any]]) -> str:
    """A Markdown table, so the same text goes to the terminal and the README."""
    header = ["benchmark", "workload", "metric", "ours", "baseline", "ratio", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        r = row if isinstance(row, dict) else row.to_dict()
        unit = f" {r['unit']}" if r["unit"] else ""
        target = "–" if r["target"] is None else f"{r['direction']} {r['target']:g}"
        met = {True: "yes", False: "no", None: "–"}[r["met"]]
        ratio_text = "–" if r["ratio"] is None else f"{_fmt(r['ratio'])}×"
        cells = [
            r["bench"],
            r["workload"],
            r["metric"] + (f" ({r['note']})" if r["note"] else ""),
            _fmt(r["ours"]) + (unit if r["ours"] is not None else ""),
            _fmt(r["baseline"]) + (unit if r["baseline"] is not None else ""),
            ratio_text,
            target,
            met,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


def finish(
    name: str, args: argparse.Namespace, rows: list[Row], details: dict[str, Any], started: float
) -> dict[str, Any]:
    """Print the benchmark's table and write ``<out>/<name>.json``; returns what was written."""
    payload = {
        "name": name,
        "quick": bool(args.quick),
        "seconds": round(time.perf_counter() - started, 2),
        "machine": machine(),
        "rows": [row.to_dict() for row in rows],
        "details": details,
    }
    path = write_json(args.out, name, payload)
    print(format_table(rows))
    print(f"\n{name}: {payload['seconds']:.0f}s, wrote {path}", file=sys.stderr)
    return payload


def log(message: str) -> None:
    """Progress goes to stderr so that stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)
