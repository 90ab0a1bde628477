"""Settings of the streams app (environment, JSON config, Kafka credentials) and the
Prometheus text it serves."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import faust
import pytest

from infra.settings import SettingsError
from streams.app import StreamsSettings
from streams.faust_app import DEFAULT_FETCH_MAX_WAIT_MS
from streams.policy import AlwaysOnPolicy, EmberPolicy
from streams.web import Metric, collect, escape_label, format_value, render


def settings(tmp_path: Path, config: dict[str, Any] | None = None, **env: str) -> StreamsSettings:
    values = {"EMBER_HOME": str(tmp_path)} | env
    if config is not None:
        path = tmp_path / "streams.json"
        path.write_text(json.dumps(config))
        values["EMBER_STREAMS_CONFIG"] = str(path)
    return StreamsSettings.from_env(values)


def test_defaults(tmp_path: Path) -> None:
    s = settings(tmp_path, EMBER_MODELS="tiny=models/tiny, llama")
    assert s.models == ("tiny", "llama")
    assert (s.group_id, s.store, s.web_host, s.web_port) == (
        "ember-streams", "memory://", "127.0.0.1", 6066
    )
    assert s.offset_reset == "latest" and s.data_dir == tmp_path / "streams"
    assert isinstance(s.scaling_policy(), EmberPolicy)
    assert s.broker_urls() == ["kafka://127.0.0.1:9092"]
    assert s.broker_credentials() is None


def test_the_json_file_names_models_and_overrides_policy_fields(tmp_path: Path) -> None:
    config = {
        "models": {"tiny": {"slots": 4, "scaling": {"floor": 1, "ceiling": 3},
                            "placement": {"dead_after_s": 2.5},
                            "admission": {"context_tokens": 1024}}},
        "admission": {"defer_s": 2, "default_tenant_limit": {"rate_per_s": 5, "burst": 10}},
        "autoscaler": {"policy": "always_on", "workers": 2},
    }
    s = settings(tmp_path, config, EMBER_MODELS="other")
    assert s.models == ("other", "tiny")
    tiny = s.model_specs()["tiny"]
    assert (tiny.scaling.floor, tiny.scaling.ceiling, tiny.scaling.slots_per_worker) == (1, 3, 4)
    assert (tiny.placement.dead_after_s, tiny.placement.default_slots) == (2.5, 4)
    assert (tiny.admission.context_tokens, tiny.admission.slots_per_worker) == (1024, 4)
    assert s.model_specs()["other"].scaling.ceiling == 8
    spec = s.admission_spec()
    assert spec.defer_s == 2 and spec.default_tenant_limit is not None
    assert set(spec.models) == {"other", "tiny"}
    policy = s.scaling_policy()
    assert isinstance(policy, AlwaysOnPolicy) and policy.workers == 2


@pytest.mark.parametrize(
    ("config", "env", "says"),
    [
        ({"models": {"tiny": {"scaling": {"flor": 1}}}}, {}, "flor"),
        ({"models": {"tiny": {"slot": 1}}}, {}, "slot"),
        ({"models": {"tiny": {"scaling": {"floor": 5, "ceiling": 1}}}}, {}, "floor"),
        (None, {"EMBER_AUTOSCALER_POLICY": "magic"}, "magic"),
        (None, {"EMBER_STREAMS_OFFSET_RESET": "middle"}, "middle"),
        (None, {"EMBER_STREAMS_WEB_PORT": "lots"}, "lots"),
        (None, {"EMBER_STREAMS_FETCH_MAX_WAIT_MS": "-1"}, "FETCH_MAX_WAIT_MS"),
        (None, {"EMBER_STREAMS_SESSION_TIMEOUT_S": "2"}, "SESSION_TIMEOUT_S=2: must be >= 6"),
    ],
)
def test_mistakes_name_what_to_fix(
    tmp_path: Path, config: dict[str, Any] | None, env: dict[str, str], says: str
) -> None:
    with pytest.raises(SettingsError, match=says):
        s = settings(tmp_path, config, **env)
        s.model_specs()


def test_the_fetch_max_wait_defaults_to_100_ms(tmp_path: Path) -> None:
    assert settings(tmp_path).fetch_max_wait_ms == DEFAULT_FETCH_MAX_WAIT_MS == 100
    assert settings(tmp_path, EMBER_STREAMS_FETCH_MAX_WAIT_MS="25").fetch_max_wait_ms == 25


def test_the_group_session_times_out_in_10_s(tmp_path: Path) -> None:
    assert settings(tmp_path).session_timeout_s == 10.0
    assert settings(tmp_path, EMBER_STREAMS_SESSION_TIMEOUT_S="30").session_timeout_s == 30.0


async def test_the_apps_consumer_gets_the_session_timeout_and_a_heartbeat_a_third_of_it() -> None:
    from streams.app import SETTINGS, app

    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        # Faust's own default is a 60 s session: a killed process's partitions waited that long
        assert consumer._session_timeout_ms == SETTINGS.session_timeout_s * 1000 == 10_000
        assert consumer._heartbeat_interval_ms == round(10_000 / 3)
    finally:
        await consumer.stop()


def test_sasl_over_tls_becomes_faust_sasl_credentials(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        EMBER_BOOTSTRAP_SERVERS="b1:9093,b2:9093",
        EMBER_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        EMBER_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        EMBER_KAFKA_SASL_USERNAME="ember",
        EMBER_KAFKA_SASL_PASSWORD="secret",
    )
    assert s.broker_urls() == ["kafka://b1:9093", "kafka://b2:9093"]
    creds = s.broker_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.mechanism.value, creds.protocol.value) == (
        "ember", "SCRAM-SHA-512", "SASL_SSL"
    )
    assert isinstance(creds.ssl_context, ssl.SSLContext)


def test_tls_alone_becomes_ssl_credentials(tmp_path: Path) -> None:
    s = settings(tmp_path, EMBER_KAFKA_SECURITY_PROTOCOL="SSL")
    creds = s.broker_credentials()
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"


# --- Prometheus text ------------------------------------------------------------------------


def test_render_writes_help_type_and_escaped_samples() -> None:
    gauge = Metric("ember_pending_requests", "gauge", "Waiting.\nFor a worker.")
    gauge.add(3, model='we"ird\\name\n', **{"class": "batch"})
    gauge.add(None, model="skipped")
    empty = Metric("ember_nothing", "counter", "No samples: left out.")
    assert render([gauge, empty]) == (
        "# HELP ember_pending_requests Waiting.\\nFor a worker.\n"
        "# TYPE ember_pending_requests gauge\n"
        'ember_pending_requests{model="we\\"ird\\\\name\\n",class="batch"} 3\n'
    )


def test_values_and_labels() -> None:
    assert [format_value(v) for v in (1.0, 0.25, 1e21, float("inf"), float("nan"))] == [
        "1", "0.25", "1e+21", "+Inf", "NaN"
    ]
    assert escape_label('a"b') == 'a\\"b'


def test_collect_turns_a_model_view_into_series() -> None:
    view = {
        "model": "tiny",
        "queue": {"pending": {"interactive": 2, "batch": 0, "eval": 0},
                  "in_flight": {"interactive": 1, "batch": 0, "eval": 0},
                  "depth": {"interactive": 3, "batch": 0, "eval": 0}},
        "warm_pool": {"by_state": {"ready": 2, "loading": 1}, "ready_slots": 16, "free_slots": 15},
        "rates": {"trailing_per_s": 0.5, "expected_per_s": None},
        "hit_rate": {"ratio": 0.75},
        "mean_service_s": 4.2,
        "autoscaler": {"last": {"inputs": {"target": 3}}},
        "totals": {"arrived": 10, "warm": 7, "cold": 3, "completed": 6},
    }
    text = render(collect([view]))
    for line in (
        'ember_pending_requests{model="tiny",class="interactive"} 2',
        'ember_queue_depth{model="tiny",class="interactive"} 3',
        'ember_workers{model="tiny",state="ready"} 2',
        'ember_workers{model="tiny",state="draining"} 0',
        'ember_warm_hit_ratio{model="tiny"} 0.75',
        'ember_scale_target_workers{model="tiny"} 3',
        'ember_requests_warm_total{model="tiny"} 7',
        "# TYPE ember_requests_arrived_total counter",
    ):
        assert line in text.splitlines()
    assert "ember_expected_request_rate" not in text  # not learned yet: no sample
