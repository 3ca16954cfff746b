"""The deploy folder's facts shared by tests/test_deploy.py and tests/test_deploy_prometheus.py:
where it is, the metrics contract of docs/operations.md ("Metrics") and the KV tiers' metrics, and the
Grafana dashboard's queries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The metrics contract (docs/operations.md, "Metrics"): name -> (Prometheus type, labels). The dashboard may use
# only these; test_api_md_lists_the_same_metrics keeps this table honest against api.md itself.
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "tkg_request_duration_seconds": ("histogram", frozenset({"method", "code"})),
    "tkg_queue_duration_seconds": ("histogram", frozenset()),
    "tkg_kernel_duration_seconds": ("histogram", frozenset({"backend"})),
    "tkg_batch_size": ("histogram", frozenset()),
    "tkg_kv_blocks_total": ("gauge", frozenset()),
    "tkg_kv_blocks_used": ("gauge", frozenset()),
    "tkg_kv_cache_usage_ratio": ("gauge", frozenset()),
    "tkg_sequences_active": ("gauge", frozenset()),
    "tkg_requests_pending": ("gauge", frozenset()),
    "tkg_requests_running": ("gauge", frozenset()),
    "tkg_tokens_appended_total": ("counter", frozenset()),
    "tkg_sequences_evicted_total": ("counter", frozenset({"reason"})),
}
# The KV tiers' metrics (api.md, fourth round, the "KV tiers" item; issue #19): name -> (type, labels),
# read by the dashboard's "KV tiers" row. test_api_md_lists_the_tier_metrics keeps it honest against api.md.
TIER_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "tkg_kv_tier_bytes": ("gauge", frozenset({"tier"})),
    "tkg_kv_tier_sequences": ("gauge", frozenset({"tier"})),
    "tkg_kv_spills_total": ("counter", frozenset({"tier"})),
    "tkg_kv_restores_total": ("counter", frozenset({"source", "result"})),
    "tkg_kv_restore_seconds": ("histogram", frozenset()),
    "tkg_kv_persisted_sequences_total": ("counter", frozenset({"result"})),
}
# Every metric the dashboard may read.
DASHBOARD_METRICS = {**METRICS, **TIER_METRICS}
# What the dashboard's Grafana variables expand to when a query is checked outside Grafana.
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*", "$method": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "tkg.json").read_text())


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(substitute: dict[str, str] = GRAFANA_VARS) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables expanded) for every query of the dashboard."""
    out = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in substitute.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out
