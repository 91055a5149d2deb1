"""``raytl submit`` / ``jobs`` / ``logs`` / ``stop``: a search as a Ray Job on a remote cluster.

The job's runtime environment carries the space file and the raytl package itself (the cluster
image supplies torch, timm, Ray and the rest), so a laptop can submit without installing anything on
the cluster. The job runs ``python -m raytl search space.yaml --address auto ...`` on the head.

Ray's token authentication: the token is read from the places Ray reads it (``RAY_AUTH_TOKEN``,
then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and sent as a bearer
header, whether or not ``RAY_AUTH_MODE`` is set on the laptop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import shutil
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytl.cluster import Token, find_token
from raytl.errors import RaytlError
from raytl.rundir import new_run_id
from raytl.space_file import load_space
from raytl.storage import is_uri, join_location

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def check_transport(address: str, token: Token | None, insecure_http: bool) -> None:
    """Refuse to send the token in plain text to another machine: ``http://`` with a token is
    for loopback (an SSH tunnel or ``kubectl port-forward``), unless the user says otherwise."""
    parsed = urllib.parse.urlsplit(address)
    host = parsed.hostname or ""
    loopback = host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
    if parsed.scheme == "http" and token is not None and not loopback and not insecure_http:
        raise RaytlError(
            f"{address}: refusing to send the Ray auth token ({token.source}) over plain http to "
            "another machine; reach the dashboard through an SSH tunnel or port-forward "
            "(http://127.0.0.1:8265), use https, or pass --insecure-http"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client(address: str | None, insecure_http: bool = False) -> Any:
    """A JobSubmissionClient for the dashboard at ``address``, authenticated; clear errors."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RaytlError(
            "no cluster address: pass --address http://HEAD:8265 (the dashboard, "
            "reached through an SSH tunnel or port-forward) or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    token = find_token()
    check_transport(address, token, insecure_http)
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        jobs = JobSubmissionClient(address, headers=headers)
    except ConnectionError as exc:
        raise RaytlError(
            f"cannot reach the Ray dashboard at {address}: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # AuthenticationError and friends
        raise _auth_error(exc, address, token) from None
    return _Checked(jobs, address, token)


def _auth_error(exc: Exception, address: str, token: Token | None) -> Exception:
    from ray.exceptions import AuthenticationError

    if isinstance(exc, RuntimeError | ValueError) and not isinstance(exc, AuthenticationError):
        # a proxy's 404, a web page, a JSON that is not Ray's version answer
        return RaytlError(
            f"{address} answered, but not as a Ray dashboard ({str(exc).splitlines()[0][:120]}); "
            "check --address: the dashboard's URL, http://HEAD:8265 by default"
        )
    if not isinstance(exc, AuthenticationError):
        return exc
    text = str(exc)
    if "Authentication required" in text or token is None:
        return RaytlError(
            f"the Ray cluster at {address} requires an auth token and none was found: "
            "set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the token file, or put it "
            "in ~/.ray/auth_token (on the head: `ray get-auth-token`)"
        )
    return RaytlError(
        f"the Ray cluster at {address} refused the auth token from {token.source}: "
        "it is not this cluster's token"
    )


class _Checked:
    """The client's calls, with authentication and connection failures turned into one line."""

    def __init__(self, jobs: Any, address: str, token: Token | None) -> None:
        self._jobs, self.address, self._token = jobs, address, token

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._jobs, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except ConnectionError as exc:
                raise RaytlError(
                    f"lost the Ray dashboard at {self.address}: {str(exc).splitlines()[0]}"
                ) from None
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    raise RaytlError(f"no such job on {self.address}: {exc}") from None
                raise
            except Exception as exc:
                error = _auth_error(exc, self.address, self._token)
                if error is exc:
                    raise
                raise error from None

        return call

    @property
    def raw(self) -> Any:
        return self._jobs


def stage(space: Path, package: bool) -> Path:
    """A temporary working directory for the job: the space file (and the raytl package)."""
    staging = Path(tempfile.mkdtemp(prefix="raytl-job-"))
    shutil.copy2(space, staging / "space.yaml")
    if package:
        shutil.copytree(
            Path(__file__).resolve().parent,
            staging / "raytl",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return staging


def run_location(output: str, run: str) -> str:
    """Where a job's run folder ``run`` (NAME-RUN_ID) ends up under ``output``."""
    return join_location(output, run) if is_uri(output) else f"{output.rstrip('/')}/{run}"


def entrypoint(
    output: str, overrides: list[str], num_samples: int | None, *, name: str, run_id: str
) -> str:
    """The job's command line, quoted for the shell the job runs in. Every job gets a run folder
    of its own (never --overwrite: two jobs of one space file must not delete each other)."""
    run = f"{name}-{run_id}"
    args = ["python", "-m", "raytl", "search", "space.yaml", "--address", "auto"]
    args += ["--run-id", run_id]
    if is_uri(output):  # results go to URI/RUN (search.storage); the head keeps a scratch copy
        args += ["--output", f"raytl-output/{run}", "--set", f"search.storage={output}"]
    else:
        args += ["--output", run_location(output, run)]
    if num_samples is not None:
        args += ["--num-samples", str(num_samples)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def submit(
    space: Path,
    *,
    address: str | None,
    output: str,
    overrides: list[str],
    num_samples: int | None = None,
    wait: bool = True,
    package: bool = True,
    insecure_http: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Submit the search; with ``wait`` follow its logs and return the job's exit status."""
    space = Path(space)
    # a wrong space fails here, not minutes later on the cluster (its paths are the cluster's)
    config = load_space(space, overrides, local_paths=False)
    if not is_uri(output) and not Path(output).is_absolute():
        warnings.warn(
            f"--output {output} is a folder in the job's working directory on the head node, "
            "which Ray may delete and the workers do not share; pass a shared folder or a URI",
            stacklevel=2,
        )
    run_id = new_run_id()
    results = run_location(output, f"{config.name}-{run_id}")
    jobs = client(address, insecure_http)
    staging = stage(space, package)
    try:
        job_id = jobs.submit_job(
            entrypoint=entrypoint(output, overrides, num_samples, name=config.name, run_id=run_id),
            runtime_env={
                "working_dir": str(staging),
                "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
            },
            metadata={"raytl_space": space.name, "raytl_results": results},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    echo(f"submitted job {job_id} to {jobs.address}; results: {results}")
    if not wait:
        echo(f"follow it: raytl logs {job_id} --address {jobs.address} --follow")
        return 0
    return follow(jobs, job_id, echo)


def follow(jobs: _Checked, job_id: str, echo: Callable[[str], None] = print) -> int:
    """Stream the job's logs until it ends; its status as an exit code."""

    async def tail() -> None:
        async for chunk in jobs.raw.tail_job_logs(job_id):
            for line in chunk.splitlines():
                echo(line)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the log stream can drop; the status below still decides
        echo(f"(log stream ended: {exc})")
    status = str(_wait_terminal(jobs, job_id))
    info = jobs.get_job_info(job_id)
    echo(
        f"job {job_id}: {status}"
        + (f" ({info.message})" if status != "SUCCEEDED" and info.message else "")
    )
    return TERMINAL.get(status, 1)


def _wait_terminal(jobs: _Checked, job_id: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(jobs.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def list_jobs(
    address: str | None, insecure_http: bool = False, echo: Callable[[str], None] = print
) -> int:
    jobs = client(address, insecure_http)
    rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0)
    if not rows:
        echo(f"no jobs on {jobs.address}")
    for job in rows:
        status = str(job.status).split(".")[-1]
        results = (job.metadata or {}).get("raytl_results", job.entrypoint)
        echo(f"{job.submission_id or job.job_id}  {status:<9}  {results}")
    return 0


def logs(
    job_id: str,
    address: str | None,
    follow_logs: bool,
    insecure_http: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    jobs = client(address, insecure_http)
    if follow_logs:
        return follow(jobs, job_id, echo)
    echo(jobs.get_job_logs(job_id).rstrip("\n"))
    return 0


def stop(
    job_id: str,
    address: str | None,
    insecure_http: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    jobs = client(address, insecure_http)
    stopped = jobs.stop_job(job_id)
    echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
