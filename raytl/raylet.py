"""The raylet's ``PrestartWorkers`` call: worker processes started ahead for a job and a runtime
env (:mod:`raytl.warm_workers` decides when and for what).

Ray's core worker makes this call in C++; Ray 2.60 exposes no Python API for it, so it is made
here over gRPC, as the core worker makes it. Only from Ray's own worker processes: a driver asks
through :func:`prestart_from_a_worker`, a task on its node, so that the driver's process (the
``raytl`` command, a test run) never starts gRPC's Python threads, whose shutdown at interpreter
exit is a known source of crashes (grpc/grpc#11804).
"""

from __future__ import annotations

import json
import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

KEEP_ALIVE_S = 600
"""How long an unused prestarted process is kept from Ray's reaping of idle workers."""

_log = logging.getLogger(__name__)


def prestart(serialized_env: str, count: int) -> None:
    """Ask this process's raylet for ``count`` processes of this job with the runtime env whose
    serialized text is ``serialized_env`` (the raylet matches actors to processes by a hash of
    that exact text). In a Ray worker process."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.utils import get_runtime_env_info, parse_runtime_env_for_task_or_actor
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    env = parse_runtime_env_for_task_or_actor(json.loads(serialized_env))
    info = get_runtime_env_info(env, is_job_runtime_env=False, serialize=False)
    info.serialized_runtime_env = serialized_env
    context = ray.get_runtime_context()
    node = next(n for n in ray.nodes() if n["NodeID"] == context.get_node_id())
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(  # type: ignore[attr-defined]
                language=common_pb2.Language.PYTHON,  # type: ignore[attr-defined]
                job_id=bytes.fromhex(context.get_job_id()),
                runtime_env_info=info,
                keep_alive_duration_secs=KEEP_ALIVE_S,
                num_workers=count,
            ),
            timeout=10,
        )
    finally:
        channel.close()


@ray.remote(num_cpus=0, max_retries=0)
def _prestart_task(requests: list[tuple[str, int]]) -> bool:
    try:
        for serialized_env, count in requests:
            prestart(serialized_env, count)
    except Exception:  # an optimisation only: those processes start cold  # noqa: BLE001
        _log.debug("raytl: prestarting worker processes failed", exc_info=True)
        return False
    return True


def prestart_from_a_worker(requests: list[tuple[str, int]]) -> ray.ObjectRef:
    """From a driver: :func:`prestart` each ``(serialized_env, count)`` in a task on this node
    (an idle process of Ray's pool runs it); the returned ref says whether all were asked for.
    Nothing needs to wait for it."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _prestart_task.options(scheduling_strategy=here).remote(requests)
