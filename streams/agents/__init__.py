"""The agents and the timer of the streams app; importing this package registers them.

    admission    ember.requests (+ the deferred topic) -> ember.admitted | rejected chunk
    placement    ember.admitted + ember.lifecycle -> ember.model.<m>, partition of a worker
    autoscaler   timer: placement tick, metric tables, scaling policy -> ember.decisions
"""

from streams.agents import admission, autoscaler, placement
from streams.agents.outbox import known_topics
from streams.app import ember_topics

known_topics(*ember_topics())

__all__ = ["admission", "autoscaler", "placement"]
