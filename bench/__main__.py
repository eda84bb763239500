"""``python -m bench``: every benchmark, one table, ``outputs/bench/summary.json``.

Each benchmark runs in its own process (``python -m bench.<name>``), so one's models and
memory never weigh on the next, and a failure is reported in the table instead of
stopping the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, ROOT, format_table, machine, write_json

BENCHES = (
    "bleu",
    "writer",
    "scaling",
    "sampling",
    "portability",
    "scoring",
    "distilabel_side",
    "distilabel_prefs",
    "vllm",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every benchmark")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON files go")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument(
        "--no-install",
        action="store_true",
        help="skip distilabel without its virtualenv, and portability without a native llama.cpp wheel",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")

    started = time.perf_counter()
    host = machine()
    status: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", "--out", str(args.out)]
        cmd += ["--quick"] if args.quick else []
        cmd += (
            ["--no-install"]
            if args.no_install and name in {"distilabel_side", "distilabel_prefs", "portability"}
            else []
        )
        print(f"\n=== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        print(done.stdout, file=sys.stderr, flush=True)
        result_file = args.out / f"{name}.json"
        entry: dict[str, Any] = {
            "returncode": done.returncode,
            "seconds": round(time.perf_counter() - begin, 1),
        }
        if result_file.exists() and result_file.stat().st_mtime >= time.time() - entry["seconds"] - 1:
            payload = json.loads(result_file.read_text())
            rows += payload["rows"]
            entry["json"] = str(result_file)
        else:
            entry["json"] = None
            rows.append(
                {
                    "bench": name, "metric": "FAILED: see the log above", "workload": "", "ours": None,
                    "baseline": None, "unit": "", "ratio": None, "target": None, "direction": ">=",
                    "note": f"exit {done.returncode}", "met": None,
                }
            )  # fmt: skip
        status[name] = entry
    total = time.perf_counter() - started
    summary = {
        "machine": host,
        "quick": args.quick,
        "total_seconds": round(total, 1),
        "command": "make bench" if not args.quick else "python -m bench --quick",
        "benchmarks": status,
        "rows": rows,
    }
    path = write_json(args.out, "summary", summary)
    print(format_table(rows))
    print(
        f"\nmachine: {host['cores']} cores ({host['cpu']}), {host['memory_gib']} GiB RAM, "
        f"load average at start {host['load_average']}; total {total / 60:.1f} min; wrote {path}"
    )
    return 0 if all(entry["returncode"] == 0 for entry in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
