"""The control plane's tables over HTTP: JSON for people and tools, Prometheus for scrapers.

Served by Faust's web server (EMBER_STREAMS_WEB_HOST:EMBER_STREAMS_WEB_PORT, default
127.0.0.1:6066), for the models this process owns:

    GET /ember/health/           200 {"ready": true, ...} once partitions are assigned and
                                 tables recovered; 503 before
    GET /ember/models/           every owned model: queue, warm pool, workers, rates, hit
                                 rate, hour-of-day profile, last scale decision
    GET /ember/models/?model=M   one model
    GET /metrics                 Prometheus text exposition format 0.0.4

Metrics (labels in braces):

    ember_streams_ready                       gauge    1 once partitions are assigned, recovered
    ember_pending_requests{model,class}       gauge    admitted, waiting for a worker
    ember_in_flight_requests{model,class}     gauge    placed on a worker, not finished
    ember_queue_depth{model,class}            gauge    pending + in flight
    ember_workers{model,state}                gauge    workers by state (warm pool: ready)
    ember_ready_slots{model}                  gauge    batch slots of ready workers
    ember_free_slots{model}                   gauge    free ones
    ember_request_rate{model}                 gauge    arrivals per second, trailing 60 s
    ember_expected_request_rate{model}        gauge    hour-of-day profile, this hour
    ember_warm_hit_ratio{model}               gauge    warm / all placements, trailing 60 s
    ember_mean_service_seconds{model}         gauge    smoothed placement-to-finish time
    ember_scale_target_workers{model}         gauge    the policy's target, when it reports one
    ember_requests_{arrived,warm,cold,completed}_total{model}   counter   placement's counters
    ember_admission_total{model,outcome,code} counter  this process's admission outcomes
    ember_placements_total{model}             counter  this process's placements
    ember_scale_decisions_total{model,action,policy}   counter   decisions published
    ember_dead_letters_total{component,reason}         counter   records dead-lettered

The text format is written by hand (`render`): `# HELP`, `# TYPE`, one sample per line,
label values escaped (backslash, double quote, newline).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from faust.web import Request, Response, View

from schemas import LATENCY_CLASSES
from streams.agents.autoscaler import owned_models
from streams.agents.outbox import COUNTERS, now_ms
from streams.agents.placement import PLACER
from streams.app import SETTINGS, app, model_partition
from streams.tables import (
    WINDOW_S,
    autoscaler,
    expected_rate,
    hit_rate,
    hourly,
    queue_depth,
    trailing_rate,
    warm_pool,
    window_sum,
    warm_placements,
    cold_placements,
)
from streams.policy import HourOfDayProfile

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- Prometheus text format ---------------------------------------------------------------


@dataclass
class Metric:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """1.0 -> '1', 0.25 -> '0.25', inf -> '+Inf', nan -> 'NaN'."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text: metrics without samples are left out."""
    lines: list[str] = []
    for metric in metrics:
        if not metric.samples:
            continue
        help_text = metric.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {metric.name} {help_text}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            series = f"{metric.name}{{{label_text}}}" if label_text else metric.name
            lines.append(f"{series} {format_value(value)}")
    return "\n".join(lines) + "\n"


# --- views of the tables ------------------------------------------------------------------


def is_ready() -> bool:
    return not app.rebalancing and app.flow_control.is_active()


def model_view(model: str, now: int) -> dict[str, Any]:
    """Everything the tables say about one owned model (JSON-ready)."""
    now_s = now / 1000
    state = PLACER.store.get(model)
    depth = dict(queue_depth.get(model) or {})
    pending = {c: int(depth.get("pending", {}).get(c, 0)) for c in LATENCY_CLASSES}
    in_flight = {c: int(depth.get("in_flight", {}).get(c, 0)) for c in LATENCY_CLASSES}
    pool = dict(warm_pool.get(model) or {})
    profile_row = hourly.get(model)
    profile = HourOfDayProfile.from_dict(profile_row) if profile_row else HourOfDayProfile()
    scaler = dict(autoscaler.get(model) or {})
    last = scaler.get("last") or None
    return {
        "model": model,
        "partition": model_partition(model),
        "queue": {
            "pending": pending,
            "in_flight": in_flight,
            "depth": {c: pending[c] + in_flight[c] for c in LATENCY_CLASSES},
            "at": depth.get("at"),
        },
        "warm_pool": {
            "by_state": pool.get("by_state", {}),
            "ready_slots": pool.get("ready_slots", 0),
            "free_slots": pool.get("free_slots", 0),
            "at": pool.get("at"),
        },
        "workers": [
            {
                "worker_id": w.worker_id,
                "state": w.state,
                "partition": w.partition,
                "node": w.node,
                "busy": w.busy,
                "total_slots": w.total_slots,
                "ready_since": w.ready_since,
                "idle_since": w.idle_since,
                "last_seen_at": w.last_seen_at,
            }
            for w in sorted(state.workers.values(), key=lambda w: w.worker_id)
        ],
        "rates": {
            "window_s": WINDOW_S,
            "trailing_per_s": round(trailing_rate(model, now_s), 4),
            "expected_per_s": expected_rate(model, now),
        },
        "hit_rate": {
            "window_s": WINDOW_S,
            "ratio": hit_rate(model, now_s),
            "warm": window_sum(warm_placements, model, now_s),
            "cold": window_sum(cold_placements, model, now_s),
        },
        "totals": {
            "arrived": state.arrivals_total,
            "warm": state.warm_total,
            "cold": state.cold_total,
            "completed": state.completed_total,
        },
        "mean_service_s": None if state.mean_service_ms is None else state.mean_service_ms / 1000,
        "hour_of_day": {"expected_per_s": [profile.expected_rate(h) for h in range(24)]},
        "autoscaler": {"policy": scaler.get("policy"), "last": last},
    }


def collect(views: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """Prometheus metrics from model views and this process's counters."""
    g = {
        name: Metric(name, "gauge", help_text)
        for name, help_text in (
            ("ember_pending_requests", "Admitted requests waiting for a worker."),
            ("ember_in_flight_requests", "Requests placed on a worker and not finished."),
            ("ember_queue_depth", "Requests pending or in flight."),
            ("ember_workers", "Workers of the model by state; ready ones are the warm pool."),
            ("ember_ready_slots", "Batch slots of ready workers."),
            ("ember_free_slots", "Free batch slots of ready workers."),
            ("ember_request_rate", "Arrivals per second over the trailing 60 s window."),
            ("ember_expected_request_rate", "Hour-of-day profile rate for the current hour."),
            ("ember_warm_hit_ratio", "Warm placements over all placements, trailing 60 s."),
            ("ember_mean_service_seconds", "Smoothed placement-to-finish time."),
            ("ember_scale_target_workers", "Workers the scaling policy aims for."),
        )
    }
    c = {
        name: Metric(name, "counter", help_text)
        for name, help_text in (
            ("ember_requests_arrived_total", "Requests that reached placement."),
            ("ember_requests_warm_total", "Requests placed at once on a ready worker."),
            ("ember_requests_cold_total", "Requests that waited for a worker."),
            ("ember_requests_completed_total", "Placed requests seen finished."),
        )
    }
    for view in views:
        model = view["model"]
        for cls in LATENCY_CLASSES:
            queue = view["queue"]
            g["ember_pending_requests"].add(queue["pending"][cls], model=model, **{"class": cls})
            g["ember_in_flight_requests"].add(
                queue["in_flight"][cls], model=model, **{"class": cls}
            )
            g["ember_queue_depth"].add(queue["depth"][cls], model=model, **{"class": cls})
        by_state = view["warm_pool"]["by_state"]
        for state in ("starting", "loading", "restoring", "warming", "ready", "draining"):
            g["ember_workers"].add(by_state.get(state, 0), model=model, state=state)
        g["ember_ready_slots"].add(view["warm_pool"]["ready_slots"], model=model)
        g["ember_free_slots"].add(view["warm_pool"]["free_slots"], model=model)
        g["ember_request_rate"].add(view["rates"]["trailing_per_s"], model=model)
        g["ember_expected_request_rate"].add(view["rates"]["expected_per_s"], model=model)
        g["ember_warm_hit_ratio"].add(view["hit_rate"]["ratio"], model=model)
        g["ember_mean_service_seconds"].add(view["mean_service_s"], model=model)
        last = view["autoscaler"]["last"] or {}
        target = (last.get("inputs") or {}).get("target")
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            g["ember_scale_target_workers"].add(target, model=model)
        totals = view["totals"]
        c["ember_requests_arrived_total"].add(totals["arrived"], model=model)
        c["ember_requests_warm_total"].add(totals["warm"], model=model)
        c["ember_requests_cold_total"].add(totals["cold"], model=model)
        c["ember_requests_completed_total"].add(totals["completed"], model=model)

    local: dict[str, Metric] = {}
    for (name, labels), value in sorted(COUNTERS.items()):
        metric = local.setdefault(name, Metric(name, "counter", _COUNTER_HELP.get(name, name)))
        metric.add(value, **dict(labels))
    up = Metric("ember_streams_ready", "gauge", "1 when partitions are assigned and recovered.")
    up.add(1 if is_ready() else 0)
    return [up, *g.values(), *c.values(), *local.values()]


_COUNTER_HELP = {
    "ember_admission_total": "Admission outcomes in this process.",
    "ember_placements_total": "Requests placed on a worker by this process.",
    "ember_scale_decisions_total": "Scale decisions published by this process.",
    "ember_dead_letters_total": "Records dead-lettered by this process.",
    "ember_lifecycle_ignored_total": "Lifecycle events of models not placed here.",
}


def _views(only: str | None = None) -> list[dict[str, Any]]:
    if not is_ready():
        return []
    now = now_ms()
    return [model_view(m, now) for m in owned_models() if only is None or m == only]


# --- pages --------------------------------------------------------------------------------


@app.page("/ember/health/")
async def health(web: View, request: Request) -> Response:
    ready = is_ready()
    body = {
        "ready": ready,
        "group": SETTINGS.group_id,
        "models": SETTINGS.models,
        "owned_models": owned_models() if ready else [],
        "policy": SETTINGS.policy_name,
    }
    return web.json(body, status=200 if ready else 503)


@app.page("/ember/models/")
async def models(web: View, request: Request) -> Response:
    only = request.query.get("model")
    views = _views(only)
    if only is not None and not views:
        return web.json({"error": f"model {only!r} is not owned by this process"}, status=404)
    return web.json({"at": now_ms(), "models": {v["model"]: v for v in views}})


@app.page("/metrics")
async def metrics(web: View, request: Request) -> Response:
    body = render(collect(_views())).encode("utf-8")
    return web.bytes(body, headers={"Content-Type": CONTENT_TYPE})
