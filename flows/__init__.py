"""Prefect orchestration, kept thin: flows read like the data path, tasks wrap shards."""

import os

# No usage telemetry from a data tool; set before Prefect is imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
