"""Ray itself: start a local Ray or join a cluster (with its token authentication), and check that
a search's trials can be placed on it before any starts.

Ray's token: read from where Ray reads it (``RAY_AUTH_TOKEN``, then the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``); ``raytl submit`` sends it as a bearer header
and ``raytl search --address`` turns token mode on when the cluster asks for one.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray._raylet import Config, GcsClient  # type: ignore[attr-defined]  # compiled, no stubs
from ray.exceptions import AuthenticationError

from raytl import preload_claims
from raytl.config import SpaceConfig
from raytl.errors import RaytlError
from raytl.schemes import assign_units
from raytl.storage import is_uri


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for error messages


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The Ray auth token, in Ray's own order of precedence; None when there is none."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise RaytlError(
                f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror or exc})"
            ) from None
        if not value:
            raise RaytlError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return Token(default.read_text().strip(), str(default))
    return None


def cluster_wants_token(address: str, wait_s: float = 10.0) -> bool | None:
    """Whether the cluster's GCS at ``address`` checks auth tokens, asked without one.

    A token-mode GCS refuses an unauthenticated call at once. The answer decides the driver's
    mode: a driver in token mode joining a cluster without it is unreachable to that cluster's
    raylets (they cannot call back into it, and its trials die before they start), and one
    without a token cannot join a token cluster. None when there is nothing to ask
    (``auto``, ``ray://``) or no answer within ``wait_s`` (ray.init then reports the address).
    """
    if address == "auto" or is_uri(address):
        return None
    answer: list[bool] = []

    def ask() -> None:
        try:
            GcsClient(address=address).internal_kv_keys(b"raytl", namespace=None, timeout=5)
            answer.append(False)
        except AuthenticationError:
            answer.append(True)
        except Exception:  # unreachable or not a GCS: ray.init says so in its own words
            pass

    thread = threading.Thread(target=ask, daemon=True)  # a dead address blocks for ~40 s
    thread.start()
    thread.join(wait_s)
    return answer[0] if answer else None


def init_ray(address: str | None) -> None:
    """Connect to a cluster (``--address``), or start a local Ray (its dashboard on 127.0.0.1)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:
        token = find_token()
        wants = cluster_wants_token(address) if "RAY_AUTH_MODE" not in os.environ else None
        if wants is None:  # not asked (mode set by the user, "auto", ray://) or no answer
            wants = token is not None and "RAY_AUTH_MODE" not in os.environ
        if wants:
            if token is None:
                raise RaytlError(
                    f"the Ray cluster at {address} uses token authentication and no "
                    "token was found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or "
                    "put it in ~/.ray/auth_token)"
                )
            # Ray only sends a token when told to (never turns authentication off)
            os.environ["RAY_AUTH_MODE"] = "token"
            Config.initialize("")  # Ray reads the mode once; make it read it again
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            hint = (
                ""
                if token
                else "; if the cluster uses token authentication, set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or put it in ~/.ray/auth_token)"
            )
            raise RaytlError(f"cannot reach the Ray cluster at {address}: {exc}{hint}") from None
        return
    # The dashboard (bound to 127.0.0.1, never 0.0.0.0) serves the State API, which Ray Train V2's
    # placement-group cleaner needs: without it, a trial that ASHA stops leaks its workers'
    # placement group and the next trial waits for CPUs forever (ray-project/ray#54305).
    # address="local": always a new Ray of our own. With None, ray.init joins whatever cluster
    # the current-cluster file names (a `ray start` cluster, or a dead one it then waits for).
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port(),
        **kwargs,
    )
    restrict_token_file()


def restrict_token_file(environ: dict[str, str] | None = None, home: Path | None = None) -> None:
    """Make the auth-token file Ray wrote for a local Ray readable by its owner only (0600):
    Ray writes it with the default umask, and anyone who reads it can run code on the cluster."""
    env = os.environ if environ is None else environ
    path = (
        Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if env.get("RAY_AUTH_TOKEN_PATH")
        else ((home or Path.home()) / ".ray" / "auth_token")
    )
    if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


# settings for the processes of the local Ray that raytl starts, each only where the environment
# does not set it already; a cluster joined with --address keeps its own (docs/benchmarks.md,
# "Trial start-up" and "Streaming"; docs/cluster.md)
LOCAL_TRAIN_SETTINGS = {
    # how often a trial's controller polls its workers (Ray's default: 2 s). Reports reach Tune,
    # and the end of the trial is seen, at the next poll: about 2 s of every trial. A missed poll
    # is no failure (a worker is declared hung after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10
    # min, unchanged), so fault tolerance is as before
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # a watcher actor per trial for node preemption (a drained node), which a Ray on one machine
    # never sees: one process fewer per trial, whose start competed for the CPU with the
    # trial's worker importing torch and timm (once measured on 2 cores: 0.7 s of its imports)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # torch's OpenMP threads (libgomp) spin 300,000 rounds waiting for the next parallel region
    # before they sleep: a CPU worker decoding streamed images between steps shared its cores
    # with a spinning thread for most of the decode (an epoch's 5,000 images: 1.05 s of decoding,
    # 0.70 s at 10,000 rounds; in-memory training no slower; benchmarks/stream.py)
    "GOMP_SPINCOUNT": "10000",
    # Train workers' processes started ahead of their trials, with torch and timm imported
    # (raytl/warm_workers.py): the raylet is asked on this machine, where the trials run
    "RAYTL_WARM_TRAIN_WORKERS": "1",
    # every Python worker process runs raytl's setup hook, which imports ahead only in a process
    # asked for a Train controller (raytl/preload_claims.py); a runtime env's own hook (the Train
    # workers') replaces it
    preload_claims.SETUP_HOOK_VAR: preload_claims.HOOK,
}


@contextlib.contextmanager
def local_train_settings() -> Iterator[None]:
    """:data:`LOCAL_TRAIN_SETTINGS` in this process's environment for the block (the local Ray's
    processes inherit it when it starts); what the environment already sets is kept."""
    added = {k: v for k, v in LOCAL_TRAIN_SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the duration of a command: a cluster joined, or a local Ray of this command's own
    (started in a private temp folder, see :func:`private_ray_temp_dir`, and shut down after)."""
    if ray.is_initialized():  # the caller's Ray (a test, a notebook): use it, leave it be
        yield
        return
    if address:
        init_ray(address)
        try:
            yield
        finally:
            ray.shutdown()
        return
    with private_ray_temp_dir(), local_train_settings():
        init_ray(None)
        try:
            # Train V2's placement-group cleaner finds its cluster through this file; here it is
            # this search's own (RAY_TMPDIR), so nobody else reads it and it names nobody else
            ray._private.utils.write_ray_address(local_gcs_address())
            yield
        finally:
            # Ray's processes must be gone before the temp folder is removed: a worker the raylet
            # started just before the shutdown creates its session folders when it gets going
            # (orphaned by then), and the folder would be left behind
            ray.shutdown(wait_for_processes=True)
            wait_for_ray_processes(os.environ["RAY_TMPDIR"])


def ray_processes(folder: str) -> set[int]:
    """The running processes, other than this one, whose environment names ``folder`` as
    ``RAY_TMPDIR``: every process of the local Ray started in it (GCS, raylet, dashboard, agents,
    workers: they inherit the variable), also one orphaned by a shutdown or a kill, and never a
    process of another Ray. Read from /proc (an empty set where there is none)."""
    entry = b"RAY_TMPDIR=" + folder.encode() + b"\0"
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if pid != os.getpid() and entry in environ.read_bytes() + b"\0" and is_running(pid):
                found.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def is_running(pid: int) -> bool:
    """Whether ``pid`` runs (from /proc; a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for_ray_processes(folder: str, timeout_s: float = 30) -> None:
    """Wait until no process of the local Ray in ``folder`` runs, at most ``timeout_s``; /proc is
    read again each time, so a worker that started during the shutdown is waited for too."""
    deadline = time.monotonic() + timeout_s
    while ray_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.1)


def local_gcs_address() -> str:
    """The GCS address of the Ray this process started."""
    return str(ray.get_runtime_context().gcs_address)


@contextlib.contextmanager
def private_ray_temp_dir() -> Iterator[Path]:
    """A Ray temp folder of this search's own (``RAY_TMPDIR``, inherited by every Ray process it
    starts), removed when the block ends, kept (and named on stderr) when it fails.

    Ray keeps its current-cluster file (``ray_current_cluster``) in its temp folder, and Train
    V2's placement-group cleaner finds the cluster through it: in the shared ``/tmp/ray``, two
    local searches at once would overwrite each other's (the cleaner then asks the wrong Ray, and
    stopped trials' placement groups leak until the search deadlocks), and one left behind makes a
    plain ``ray.init()`` in any other program wait for a dead cluster. Ray's own logs of the
    search live there too; they are what one reads after a failure.
    """
    previous = os.environ.get("RAY_TMPDIR")
    folder = Path(tempfile.mkdtemp(prefix="raytl-ray-"))
    os.environ["RAY_TMPDIR"] = str(folder)
    failed = False
    try:
        yield folder
    except RaytlError:  # a clear error of raytl's own: Ray's logs add nothing
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        if failed:
            print(f"raytl: Ray's logs of this run are kept in {folder}/ray", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A free port on 127.0.0.1, so a second local search does not collide on the dashboard's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DASHBOARD_PORTS = range(20000, 32768)
"""Where the local Ray's dashboard port is drawn: above Ray's worker ports (10002-19999) and below
Linux's ephemeral range (32768-60999 by default), from which the kernel hands out the ports of
``bind(0)`` and of outgoing connections. A port found free in that range (:func:`free_port`) can
be taken by one of Ray's own processes before the dashboard binds it: it was, once, in a
benchmark ("Failed to find a valid port for dashboard ... address already in use")."""


def dashboard_port() -> int:
    """A free port on 127.0.0.1 for the local Ray's dashboard, drawn from :data:`DASHBOARD_PORTS`
    below the kernel's ephemeral range (so a second local search does not collide on it either,
    and nothing of Ray's takes it meanwhile); any free port if none of 64 drawn is free."""
    ports = range(DASHBOARD_PORTS.start, min(DASHBOARD_PORTS.stop, ephemeral_ports().start))
    for port in random.SystemRandom().sample(ports, min(64, len(ports))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """The kernel's ephemeral port range (Linux); 32768-60999, its default, where unreadable."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(low, high + 1)


def check_resources(config: SpaceConfig) -> None:
    """Fail before starting if a trial can never be placed on the nodes alive now."""
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fits(config, alive)


def check_fits(config: SpaceConfig, nodes: list[dict[str, float]]) -> None:
    """Raise a RaytlError if a trial of ``config`` can never be placed on ``nodes`` (each node's
    resources, ``{"CPU": 4, "GPU": 1}``) or its units cannot be shared out among its workers.
    Also run on the shipped cluster configs' node shapes (tests/test_cluster_configs.py)."""
    r = config.resources
    assign_units(config.scheme.size, r.workers_per_trial)  # raises if W does not fit U
    fits = [
        n
        for n in nodes
        if n.get("CPU", 0) >= r.cpus_per_worker and n.get("GPU", 0) >= r.gpus_per_worker
    ]
    if not fits:
        biggest = max((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes)
        raise RaytlError(
            f"{config.source}: resources: a worker asks for {r.cpus_per_worker} CPU and "
            f"{r.gpus_per_worker} GPU, but the largest node has {biggest[0]:g} CPU and {biggest[1]:g} GPU"
        )
    slots = sum(worker_slots(n, r.cpus_per_worker, r.gpus_per_worker) for n in fits)
    if slots < r.workers_per_trial:
        raise RaytlError(
            f"{config.source}: resources: a trial needs {r.workers_per_trial} workers of "
            f"{r.cpus_per_worker} CPU and {r.gpus_per_worker} GPU, but the whole cluster fits only "
            f"{slots} at once"
        )


def worker_slots(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of this size one node holds (trials queue for free slots, never fail)."""
    count = int(resources.get("CPU", 0) // cpus)
    if gpus > 0:
        count = min(count, int(resources.get("GPU", 0) // gpus))
    return count
