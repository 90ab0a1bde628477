"""The control plane's decisions as pure functions: admission, placement, autoscaling.

No Faust, no Kafka, no clock: time is an argument (unix ms, int), state is a frozen value the
caller stores (`to_dict` / `from_dict` for a table), outputs are plain values or `schemas`
messages. The streams agents, the tests and the fleet simulator run the same code.

    admission.admit(spec, state, request, now) -> (state, AdmissionResult)
    placement.on_admitted / on_admitted_all / on_lifecycle / on_completed / tick(spec, state,
        ..., now) -> PlacementStep;  placement.observe(spec, state, now) -> Observation
    autoscaler.decide(spec, state, observation, now) -> (state, [Decision])
    baselines: FullyColdPolicy, AlwaysOnPolicy, KnativePolicy (the same Policy protocol)
"""

from streams.policy.admission import (
    AdmissionResult,
    AdmissionSpec,
    AdmissionState,
    ModelAdmission,
    ModelLoad,
    TenantLimit,
    admit,
)
from streams.policy.autoscaler import EmberPolicy, EmberState, decide
from streams.policy.baselines import (
    AlwaysOnPolicy,
    BaselineState,
    FullyColdPolicy,
    KnativePolicy,
    KnativeState,
)
from streams.policy.placement import (
    Placement,
    PlacementSpec,
    PlacementState,
    PlacementStep,
    Reassignment,
    WorkerGone,
    observe,
    on_admitted,
    on_admitted_all,
    on_completed,
    on_lifecycle,
    tick,
)
from streams.policy.scaling import Decision, Observation, Policy, ScalingSpec, WorkerSnapshot
from streams.policy.windows import Buckets, HourOfDayProfile

# Policy classes by the name they write into ScaleDecision.policy; build one with its tuning,
# e.g. POLICIES["always_on"](workers=2).
POLICIES: dict[str, type] = {
    cls().name: cls for cls in (EmberPolicy, FullyColdPolicy, AlwaysOnPolicy, KnativePolicy)
}

__all__ = [
    "POLICIES",
    "AdmissionResult",
    "AdmissionSpec",
    "AdmissionState",
    "AlwaysOnPolicy",
    "BaselineState",
    "Buckets",
    "Decision",
    "EmberPolicy",
    "EmberState",
    "FullyColdPolicy",
    "HourOfDayProfile",
    "KnativePolicy",
    "KnativeState",
    "ModelAdmission",
    "ModelLoad",
    "Observation",
    "Placement",
    "PlacementSpec",
    "PlacementState",
    "PlacementStep",
    "Policy",
    "Reassignment",
    "ScalingSpec",
    "TenantLimit",
    "WorkerGone",
    "WorkerSnapshot",
    "admit",
    "decide",
    "observe",
    "on_admitted",
    "on_admitted_all",
    "on_completed",
    "on_lifecycle",
    "tick",
]
