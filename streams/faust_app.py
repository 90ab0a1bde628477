"""The Faust app class Ember runs: Faust's, with two costs of its defaults taken out.

1. Fetch long polls. Faust creates its Kafka consumer with `fetch_max_wait_ms=1500` and no
   setting to change it. aiokafka keeps one fetch in flight per broker, and leaves out of it
   every partition whose fetched records the app has not taken yet. Under load that is the
   busy partitions (`ember.requests`, `ember.admitted`), so the fetch sent right after a
   response covers only idle ones (changelogs, the deferred topic), and the broker holds it
   for the whole wait: for up to 1.5 s nothing new is fetched for the busy partitions, even
   once the app has taken what it had. The control-plane benchmark showed it as seconds with
   no placement at all and multi-second latency from 400 requests/s. `fetch_max_wait_ms`
   (EMBER_STREAMS_FETCH_MAX_WAIT_MS) bounds that stall; an idle process sends that many
   more empty fetches (10 a second at 100 ms), which costs the broker next to nothing.
2. The Monitor sensor: per-event statistics (Faust's own /stats page) that nothing of Ember
   reads, paid on every record in and out. Ember's counters are streams.agents.outbox's,
   served on /metrics.
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

DEFAULT_FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it creates its fetcher: the constructor
        # argument Faust fixes at 1500 ms.
        consumer._fetch_max_wait_ms = getattr(
            self.app, "fetch_max_wait_ms", DEFAULT_FETCH_MAX_WAIT_MS
        )
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer: ClassVar[Any] = _Consumer


class EmberApp(faust.App):
    """`faust.App` with the consumer's fetch wait bounded and without the Monitor sensor (see
    the module docstring). Takes Faust's options plus `fetch_max_wait_ms`. Kafka only
    (`kafka://` broker URLs)."""

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS, **options: Any
    ) -> None:
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must be >= 0, got {fetch_max_wait_ms}")
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **options)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def on_init_dependencies(self) -> Any:
        dependencies = super().on_init_dependencies()  # adds the monitor to the sensors
        if self.monitor in set(self.sensors):
            self.sensors.remove(self.monitor)
        return dependencies
