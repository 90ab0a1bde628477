"""The supervisor (actuator): turns scale decisions into worker processes.

    plan.py        pure: ModelCatalog, RestartPolicy, Fleet and the decision/exit/tick -> action
                   functions (no processes, no Kafka, time passed in)
    backends.py    WorkerBackend protocol; LocalProcessBackend and its PrestartPool (Kubernetes
                   mapping documented there)
    supervisor.py  Supervisor: the Kafka loop that reads decisions and carries out actions
    commands.py    `ember supervisor --model NAME=DIR [--prestart N]`
"""

from infra.supervisor.backends import (
    BackendError,
    LocalProcessBackend,
    LocalWorker,
    PrestartPool,
    WorkerBackend,
    WorkerHandle,
    WorkerStatus,
)
from infra.supervisor.plan import CatalogError, Fleet, ModelCatalog, RestartPolicy
from infra.supervisor.supervisor import (
    Supervisor,
    SupervisorConfig,
    SupervisorError,
    WorkerOptions,
)

__all__ = [
    "BackendError",
    "CatalogError",
    "Fleet",
    "LocalProcessBackend",
    "LocalWorker",
    "ModelCatalog",
    "PrestartPool",
    "RestartPolicy",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorError",
    "WorkerBackend",
    "WorkerHandle",
    "WorkerOptions",
    "WorkerStatus",
]
