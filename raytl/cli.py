"""The ``raytl`` command. Each subcommand reads: validate, build, run, report.

User errors (a bad space file, a missing folder, unreadable data) print one line and exit 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from raytl import __version__
from raytl.cli_compare import add_compare, paired_options
from raytl.cli_models import MODEL_COMMANDS, add_model_commands
from raytl.errors import RaytlError


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the space file (data.limit=500); a bare hyperparameter name fixes "
        "it (strategy=fine_tune)",
    )


def _add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="an existing Ray cluster (auto, or HOST:PORT); default: a local Ray"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and Tune's own output here too (default: in OUTPUT/ray-output.log)",
    )


def _add_insecure_http(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="send the auth token over plain http to a non-loopback address (it travels "
        "unencrypted; prefer an SSH tunnel or port-forward to 127.0.0.1)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytl",
        description="Search how best to transfer a pretrained image model to a task.",
    )
    parser.add_argument("--version", action="version", version=f"raytl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="search strategies and hyperparameters with Ray Tune")
    p.add_argument("space", help="space file (search_spaces/quickstart.yaml)")
    p.add_argument("--output", help="output folder (default: runs/NAME)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    _add_ray(p)
    p.add_argument("--num-samples", type=int, help="trials (overrides search.num_samples)")
    p.add_argument(
        "--run-id",
        type=_run_id,
        help="name this run (its folder on search.storage is NAME-RUN_ID); raytl submit sets it "
        "so the job's folder is known before the job starts (default: a new one)",
    )
    _add_set(p)

    p = sub.add_parser("resume", help="continue an interrupted search in its output folder")
    p.add_argument("dir", help="the search's output folder (it holds space.yaml)")
    p.add_argument(
        "--trust-storage",
        action="store_true",
        help="resume from search.storage on a URI: its experiment state is unpickled, which "
        "runs code, so only when nobody you do not trust can write there",
    )
    _add_ray(p)

    p = add_compare(sub)
    _add_ray(p)
    _add_set(p)

    p = sub.add_parser("submit", help="run a search on a Ray cluster as a Ray Job (Jobs API)")
    p.add_argument("space", help="space file; it travels with the job")
    p.add_argument(
        "--address",
        help="the cluster's dashboard, http://HEAD:8265 (default: "
        "RAY_API_SERVER_ADDRESS or RAY_ADDRESS)",
    )
    p.add_argument(
        "--output",
        help="where the job's run folder (NAME-RUN_ID) goes: a folder all the cluster's nodes "
        "share, or a URI such as s3://bucket/runs (default: search.storage, else runs/ in "
        "the job's working directory on the head, which Ray may delete)",
    )
    p.add_argument("--num-samples", type=int, help="trials (overrides search.num_samples)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    _add_insecure_http(p)
    p.add_argument(
        "--no-package",
        action="store_true",
        help="do not ship the local raytl package; use the one in the cluster image",
    )
    _add_set(p)

    p = sub.add_parser("jobs", help="list the Ray Jobs on a cluster")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265")
    _add_insecure_http(p)
    p = sub.add_parser("logs", help="print (or --follow) a Ray Job's logs")
    p.add_argument("job_id")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265")
    _add_insecure_http(p)
    p.add_argument(
        "--follow", action="store_true", help="stream until the job ends; exit with its status"
    )
    p = sub.add_parser("stop", help="stop a Ray Job")
    p.add_argument("job_id")
    p.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265")
    _add_insecure_http(p)

    p = sub.add_parser("report", help="write DIR/report.md and its plots for a finished search")
    p.add_argument("dir")

    p = sub.add_parser("train", help="train one configuration (no search, no Ray)")
    p.add_argument("space", help="space file (its constants and defaults give the configuration)")
    p.add_argument("--output", help="output folder (default: runs/NAME-train-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_set(p)

    add_model_commands(sub)  # predict, evaluate, export

    data = sub.add_parser("data", help="inspect or convert data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("inspect", help="classes, counts per class, unreadable files")
    p.add_argument(
        "source",
        help="an image folder, a folder of Parquet shards, digits, fashion-mnist or synthetic",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        help="flag images larger than this as decompression bombs (data.max_pixels; "
        "default: the space files' default)",
    )
    p = data.add_parser("convert", help="write an image folder as Parquet shards")
    p.add_argument("imagefolder")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000)
    return parser


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"raytl: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # warnings about the user's input are for the user: one line, not raytl's source location
    warnings.formatwarning = _one_line_warning
    try:
        return COMMANDS[(args.command, getattr(args, "data_command", None))](args)
    except RaytlError as exc:  # DataError and ConfigError are RaytlErrors
        print(f"raytl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raytl: interrupted", file=sys.stderr)
        return 130


def cmd_search(args: argparse.Namespace) -> int:
    from raytl.rundir import prepare_output
    from raytl.search import run_search
    from raytl.space_file import load_space

    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"search.num_samples={args.num_samples}")
    config = load_space(args.space, overrides)
    output = prepare_output(
        Path(args.output or f"runs/{config.name}"),
        overwrite=args.overwrite,
        protect=_inputs(args.space, config.data.path),
        run_id=args.run_id,
    )
    run_search(config, output, address=args.address, verbose=args.verbose)
    return 0


def _run_id(text: str) -> str:
    if not text or not all(c.isalnum() or c in "._-" for c in text) or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-', got {text!r}")
    return text


def _inputs(space: str, data_path: str | None) -> list[Path]:
    """What a command reads and ``--overwrite`` must never clear: the space file's folder and
    the data."""
    return [Path(space).parent] + ([Path(data_path)] if data_path else [])


def cmd_resume(args: argparse.Namespace) -> int:
    from raytl.search import run_search
    from raytl.space_file import load_space

    output = Path(args.dir)
    if not (output / "space.yaml").is_file():
        raise RaytlError(f"{output}: no space.yaml; expected the output folder of `raytl search`")
    config = load_space(output / "space.yaml")
    run_search(
        config,
        output,
        address=args.address,
        resume=True,
        trust_storage=args.trust_storage,
        verbose=args.verbose,
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from raytl.compare import COMPARE_OUTPUTS, parse_schemes, run_compare
    from raytl.paired import PAIRED_OUTPUTS, run_paired
    from raytl.rundir import prepare_output
    from raytl.space_file import load_space

    schemes = parse_schemes(args.schemes)
    try:
        paired = paired_options(args)
    except ValueError as exc:
        raise RaytlError(str(exc)) from None
    config = load_space(args.space, list(args.overrides))
    output = prepare_output(
        Path(args.output or f"runs/{config.name}-compare"),
        overwrite=args.overwrite,
        protect=_inputs(args.space, config.data.path),
        clear=COMPARE_OUTPUTS + PAIRED_OUTPUTS,
    )
    common = {"schemes": schemes, "repeats": args.repeats, "address": args.address}
    if paired is not None:
        run_paired(config, output, **paired, **common, verbose=args.verbose)
    else:
        run_compare(config, output, **common, refit_sample=args.refit_sample, verbose=args.verbose)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from raytl.jobs import submit
    from raytl.space_file import load_space

    config = load_space(args.space, list(args.overrides), local_paths=False)
    return submit(
        Path(args.space),
        address=args.address,
        output=args.output or config.search.storage or "runs",
        overrides=list(args.overrides),
        num_samples=args.num_samples,
        wait=not args.no_wait,
        package=not args.no_package,
        insecure_http=args.insecure_http,
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    from raytl.jobs import list_jobs

    return list_jobs(args.address, args.insecure_http)


def cmd_logs(args: argparse.Namespace) -> int:
    from raytl.jobs import logs

    return logs(args.job_id, args.address, args.follow, args.insecure_http)


def cmd_stop(args: argparse.Namespace) -> int:
    from raytl.jobs import stop

    return stop(args.job_id, args.address, args.insecure_http)


def cmd_report(args: argparse.Namespace) -> int:
    from raytl.report import write_report

    path = write_report(Path(args.dir))
    print(f"wrote {path}")
    print(
        f"review the trials: tensorboard --logdir {Path(args.dir) / 'tensorboard'} --host 127.0.0.1"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raytl.rundir import prepare_output
    from raytl.space_file import load_space
    from raytl.train import TRAIN_OUTPUTS, train_single

    config = load_space(args.space, args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output = prepare_output(
        Path(args.output or f"runs/{config.name}-train-{stamp}"),
        overwrite=args.overwrite,
        protect=_inputs(args.space, config.data.path),
        clear=TRAIN_OUTPUTS,
    )
    progress = not args.no_progress and sys.stderr.isatty()
    train_single(config, output, progress=progress)
    print(f"saved to {output}")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from raytl import evaluate, export, predict  # raytl.cli_models' commands: torch loads here

    return {"predict": predict, "evaluate": evaluate, "export": export}[args.command].run(args)


def _source_and_path(source: str) -> tuple[str, str | None]:
    if source in ("digits", "fashion-mnist", "synthetic"):
        return source, None
    path = Path(source)
    if path.is_dir() and any(path.glob("*.parquet")) or path.suffix == ".parquet":
        return "parquet", source
    return "imagefolder", source


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from raytl.data import inspect_source

    if args.max_pixels is not None and args.max_pixels <= 0:
        raise RaytlError(f"--max-pixels: expected > 0, got {args.max_pixels}")
    source, path = _source_and_path(args.source)
    limit = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    print(inspect_source(source, path=path, **limit).format())
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from raytl.data import convert_imagefolder
    from raytl.storage import is_uri, shown_location

    paths = convert_imagefolder(args.imagefolder, args.out_dir, shard_size=args.shard_size)
    where = shown_location(args.out_dir) if is_uri(args.out_dir) else os.path.abspath(args.out_dir)
    print(f"wrote {len(paths)} shard(s) to {where}")
    return 0


COMMANDS = {
    ("search", None): cmd_search,
    ("resume", None): cmd_resume,
    ("compare", None): cmd_compare,
    ("submit", None): cmd_submit,
    ("jobs", None): cmd_jobs,
    ("logs", None): cmd_logs,
    ("stop", None): cmd_stop,
    ("train", None): cmd_train,
    ("report", None): cmd_report,
    ("data", "inspect"): cmd_data_inspect,
    ("data", "convert"): cmd_data_convert,
} | {(name, None): cmd_model for name in MODEL_COMMANDS}
