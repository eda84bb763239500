"""``python -m flows.deploy``: create (or update) the deployments that ``prefect.yaml`` defines.

``prefect.yaml`` stays the one place the deployments are described; this reads it and
registers them through Prefect's Python API (``RunnerDeployment.apply``). It exists
because ``prefect deploy`` in Prefect 3.8.8 cannot finish against a 3.8.8 server
with the FastAPI versions it runs on (<0.155): after creating the first deployment it
asks the server for the pool's online workers with ``"limit": null``, which the
server rejects (HTTP 422), so the other deployments are never created.

Every deployment's pull step sets the working directory to this checkout, so
process workers load the flows from here; workers on another machine need a
checkout at the same path (``--checkout`` records a different one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
APPLIED_KEYS = {"name", "description", "entrypoint", "parameters", "schedules", "work_pool", "tags"}


def load_specs(config: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ValueError(f"{config}: expected a 'deployments' list")
    return data["deployments"]


def build(spec: dict[str, Any], checkout: Path) -> Any:
    """A ``RunnerDeployment`` for one prefect.yaml entry (entrypoint, parameters, schedules, work pool)."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    unknown = set(spec) - APPLIED_KEYS
    if unknown:
        raise ValueError(f"deployment {spec.get('name')!r}: keys this script cannot apply: {sorted(unknown)}")
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
        for s in spec.get("schedules") or []
    ]
    pool = spec.get("work_pool") or {}
    deployment = RunnerDeployment.from_entrypoint(
        entrypoint=spec["entrypoint"],
        name=spec["name"],
        description=spec.get("description"),
        parameters=spec.get("parameters") or {},
        schedules=schedules or None,
        tags=spec.get("tags"),
        work_pool_name=pool.get("name"),
        work_queue_name=pool.get("work_queue_name"),
        job_variables=pool.get("job_variables") or {},
    )
    deployment.storage = LocalStorage(path=str(checkout))
    return deployment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "prefect.yaml")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="where workers find this repository")
    parser.add_argument("--name", action="append", help="only these deployments (default: all)")
    args = parser.parse_args(argv)
    os.chdir(args.checkout)  # entrypoints in prefect.yaml are relative to the checkout
    if str(args.checkout) not in sys.path:
        sys.path.insert(0, str(args.checkout))
    specs = [s for s in load_specs(args.config) if not args.name or s["name"] in args.name]
    if not specs:
        print(f"error: no deployment named {args.name} in {args.config}", file=sys.stderr)
        return 2
    for spec in specs:
        deployment = build(spec, args.checkout.resolve())
        deployment_id = deployment.apply()
        flow_name = deployment.flow_name
        pool = (spec.get("work_pool") or {}).get("name")
        print(f"deployment '{flow_name}/{spec['name']}' ({deployment_id}) on work pool {pool!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
