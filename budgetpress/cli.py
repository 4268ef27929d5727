"""The budgetpress command line: ``search``, ``export``, ``plot``, ``dashboard``, ``model train-builtin``,
``model info``, and the service's ``serve``, ``runner`` and ``keys``.

Bad input exits with code 2 and one line on stderr; with ``--json`` stdout holds only JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class UsageError(Exception):
    """Bad input from the command line; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    from budgetpress.search import STRATEGIES

    parser = _Parser(prog="budgetpress", description="Compression search for language models under a memory budget.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    search = commands.add_parser("search", help="search per-layer compression settings under a budget")
    search.add_argument("--model", default="builtin", help="'builtin', a local transformers directory, or a hub id")
    search.add_argument(
        "--budget",
        required=True,
        help="memory budget: '35%%' of dense, '6GiB', or bytes '1.5e9'; several, comma-separated "
        "('25%%,30%%,40%%'), search each in one study that shares evaluations (a frontier search)",
    )
    search.add_argument(
        "--workload", default="batch=1,context=512", help="KV-cache workload, e.g. batch=1,context=2048"
    )
    search.add_argument("--strategy", default="tpe", choices=list(STRATEGIES))
    search.add_argument("--trials", type=int, default=40, help="number of trials (evaluated plans) per budget")
    search.add_argument("--storage", default=None, help="database URL (default: sqlite file in the working directory)")
    search.add_argument("--study", default=None, help="study name (default: a new, timestamped name)")
    search.add_argument(
        "--resume", action="store_true", help="continue the existing --study where it stopped (up to --trials)"
    )
    search.add_argument("--workers", type=int, default=2, help="Ray workers evaluating plans in parallel")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument(
        "--grouping", default="unit", choices=["unit", "layer", "role"], help="which units share one choice"
    )
    search.add_argument(
        "--space",
        default="bits",
        help="what to search, any of bits,sparsity,rank,kv (comma-separated; default: bits)",
    )
    search.add_argument(
        "--method",
        default=None,
        help="how each dimension's variants are made: bits=rtn|gptq, sparsity=magnitude|wanda|sparsegpt, "
        "rank=svd|svd-llm (default: bits=gptq,sparsity=sparsegpt,rank=svd-llm)",
    )
    search.add_argument(
        "--store",
        default=None,
        type=Path,
        help="level store folder: every unit's variants, computed once and reused "
        "(default: $BUDGETPRESS_STORE, else ~/.cache/budgetpress/levels)",
    )
    search.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="FILE",
        help="calibrate and evaluate on these text files instead of the built-in corpus",
    )
    search.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    search.add_argument("-v", "--verbose", action="store_true")
    model = commands.add_parser("model", help="the built-in model").add_subparsers(
        dest="model_command", required=True, parser_class=_Parser
    )
    train = model.add_parser("train-builtin", help="train the built-in model from its recipe")
    train.add_argument("--preset", default="full", choices=["full", "micro"])
    train.add_argument("--out", required=True, type=Path, help="directory to write weights, config and manifest")
    train.add_argument("--steps", type=int, default=None, help="override the first phase's step count")
    train.add_argument(
        "--first-phase-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="skip the first phase: continue from the checkpoint it wrote in DIR (same preset)",
    )
    train.add_argument("--json", action="store_true")
    info = model.add_parser("info", help="describe a model")
    info.add_argument("name", help="'builtin' or a local directory")
    info.add_argument("--json", action="store_true")
    _add_service_commands(commands)
    _add_export_command(commands)
    _add_dashboard_commands(commands)
    return parser


_STORAGE_HELP = "database URL (default: $BUDGETPRESS_DATABASE_URL, else budgetpress.db in the working directory)"


def _add_service_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the REST API and a job runner")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--storage", default=None, help=_STORAGE_HELP)
    serve.add_argument("--no-runner", action="store_true", help="serve the API only (run `budgetpress runner` apart)")
    serve.add_argument("--model-root", type=Path, default=None, help="local models jobs may name, relative to it")
    serve.add_argument("--allow-hub-id", action="append", default=None, metavar="ID", help="a hub id jobs may name")
    serve.add_argument("-v", "--verbose", action="store_true")
    runner = commands.add_parser("runner", help="run a job runner alone (several may share a PostgreSQL queue)")
    runner.add_argument("--storage", default=None, help=_STORAGE_HELP)
    runner.add_argument("--model-root", type=Path, default=None)
    runner.add_argument("--allow-hub-id", action="append", default=None, metavar="ID")
    runner.add_argument("-v", "--verbose", action="store_true")
    keys = commands.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True, parser_class=_Parser
    )
    create = keys.add_parser("create", help="make a key for a tenant; printed once, alone on the last line")
    create.add_argument("--tenant", required=True)
    create.add_argument("--storage", default=None, help=_STORAGE_HELP)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")
    revoke.add_argument("--storage", default=None, help=_STORAGE_HELP)


def _default_storage() -> str:
    return f"sqlite:///{Path.cwd() / 'budgetpress.db'}"


def _default_study_name() -> str:
    return f"search-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _plan_table(space: Any, plan: Any) -> str:
    """Per-layer allocation: one row per decoder layer, one column per linear role."""
    from budgetpress.space import LinearSetting, effective_bits

    units = space.profile.linear_units
    roles = list(dict.fromkeys(u.role for u in units))
    width = max(8, *(len(r) for r in roles))
    lines = ["layer " + " ".join(f"{r:>{width}}" for r in roles) + f" {'avg bits':>9}  kv cache"]
    for layer in sorted({u.layer for u in units}):
        members = [u for u in units if u.layer == layer]
        cells = {u.role: plan.get(u.key) for u in members}
        params = sum(u.in_features * u.out_features for u in members)
        bits = sum(
            effective_bits(u, plan.get(u.key, LinearSetting())) * u.in_features * u.out_features for u in members
        )
        row = " ".join(f"{(cells[r].label() if cells.get(r) else '16b'):>{width}}" for r in roles)
        kv = plan.get(f"kv.{layer}")
        lines.append(f"{layer:>5} {row} {bits / params:>9.2f}  {kv.label() if kv else '16b'}")
    return "\n".join(lines)


def _result_row(name: str, memory_bytes: int, kl: float, ppl: float) -> str:
    return f"{name:<15} {memory_bytes / 1024 / 1024:>12.3f} {kl:>9.5g} {ppl:>9.3f}"


def _human_summary(report: Any) -> str:
    mib = 1024 * 1024
    lines = [
        f"study {report.request.study_name} in {report.request.storage}",
        f"dense {report.dense_bytes / mib:.3f} MiB; {report.n_complete}/{report.n_trials} trials complete",
    ]
    for budget in report.budgets:
        lines += [
            "",
            f"budget {budget.budget} = {budget.budget_bytes / mib:.3f} MiB: best plan (trial {budget.best_trial})",
            _plan_table(report.space, budget.best.plan),
            "held-out          memory MiB        KL       ppl",
            _result_row("best plan", budget.best.memory_bytes, budget.best.kl, budget.best.ppl),
            _result_row("best uniform", budget.uniform.memory_bytes, budget.uniform.kl, budget.uniform.ppl),
            _result_row("dense", report.dense_bytes, 0.0, report.dense_ppl),
        ]
    lines.append(f"\nPareto front (calibration KL): {len(report.pareto)} plans")
    lines += [f"  trial {p.trial:>5} {p.memory_bytes / mib:>10.3f} MiB  KL {p.kl:.5g}" for p in report.pareto]
    return "\n".join(lines)


class _BarProgress:
    """A tqdm bar on stderr for trials, and one line per stage."""

    shows_bars = True

    def __init__(self, total: int) -> None:
        self._total = total
        self._bar: Any = None
        self._best = float("inf")

    def stage(self, text: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(f"budgetpress: {text}", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Never stops a search: Ctrl-C does."""

    def trial(self, record: Any, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr, dynamic_ncols=True)
        fitness = record.outcome.fitness
        if fitness is not None:
            self._best = min(self._best, fitness)
        self._bar.set_postfix(best_kl=f"{self._best:.4g}", refresh=False)
        self._bar.update(1)


def _cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    from budgetpress.evaluators import SEARCH_METHODS, Methods, default_store_root
    from budgetpress.space import Budget, Grouping, Workload, parse_dimensions
    from budgetpress.workers import SearchRequest, run_search

    request = SearchRequest(
        dimensions=parse_dimensions(args.space),
        methods=Methods.parse(args.method or SEARCH_METHODS).to_text(),
        store_root=str(args.store or default_store_root()),
        model=args.model,
        budgets=tuple(Budget.parse(part) for part in args.budget.split(",")),
        resume=args.resume,
        workload=Workload.parse(args.workload),
        strategy=args.strategy,
        n_trials=args.trials,
        storage=args.storage or _default_storage(),
        study_name=args.study or _default_study_name(),
        n_workers=args.workers,
        seed=args.seed,
        grouping=Grouping(args.grouping),
        text_files=tuple(args.text),
    )
    if args.resume and not args.study:
        raise UsageError("--resume needs --study NAME: the study to continue")
    report = run_search(request, _BarProgress(args.trials))
    from budgetpress.dashboard import attach_finished_study_plots

    attach_finished_study_plots(request.storage, request.study_name)
    if not args.json:
        print(_human_summary(report))
    return report.to_dict()


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from budgetpress.evaluators import PRESETS, train_builtin

    recipe = PRESETS[args.preset]
    steps = args.steps if args.steps is not None else recipe.steps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1; got {steps}")
    if args.first_phase_from is not None and args.steps is not None:
        raise UsageError("--steps sets the first phase, which --first-phase-from skips; give one of them")
    lookup_steps = 0 if recipe.lookup is None else recipe.lookup.steps
    total = lookup_steps + (0 if args.first_phase_from is not None else steps)
    with tqdm(total=total, desc=f"training {args.preset}", unit="step", file=sys.stderr) as bar:

        def on_step(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

        manifest = train_builtin(
            preset=args.preset,
            out_dir=args.out,
            steps=args.steps,
            on_step=on_step,
            first_phase_from=args.first_phase_from,
        )
    if not args.json:
        print(
            f"wrote {args.out}: {manifest['n_params']} parameters, held-out "
            f"{manifest['heldout_bits_per_byte']} bits per byte"
            + ("" if manifest["lookup"] is None else f", recall accuracy {manifest['lookup']['recall_accuracy']}")
        )
    return {"out": str(args.out), **{k: manifest[k] for k in ("n_params", "heldout_bits_per_byte", "weights_sha256")}}


def _cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from budgetpress.evaluators import profile_source, read_manifest, resolve_model
    from budgetpress.space import Workload, dense_bytes

    source = resolve_model(args.name)
    profile = profile_source(source)
    info: dict[str, Any] = {
        "model": args.name,
        "architecture": profile.architecture,
        "n_params": profile.n_params,
        "n_layers": profile.n_layers,
        "n_linear_units": len(profile.linear_units),
        "dense_bytes_default_workload": dense_bytes(profile, Workload()),
    }
    if source.local_dir is not None and (source.local_dir / "manifest.json").is_file():
        manifest = read_manifest(source.local_dir)
        info.update(
            heldout_bits_per_byte=manifest["heldout_bits_per_byte"],
            weights_sha256=manifest["weights_sha256"],
            recipe=manifest["recipe"],
        )
    if not args.json:
        for key, value in info.items():
            if key != "recipe":
                print(f"{key:>30}: {value}")
    return info


def _service_settings(args: argparse.Namespace) -> Any:
    from budgetpress.api import ServiceSettings

    hub_ids = getattr(args, "allow_hub_id", None)
    return ServiceSettings.from_env(
        database_url=args.storage,
        model_root=getattr(args, "model_root", None),
        allowed_hub_ids=tuple(hub_ids) if hub_ids else None,
    )


def _cmd_service(args: argparse.Namespace) -> dict[str, Any]:
    from budgetpress import api

    settings = _service_settings(args)
    if args.command == "serve":
        api.serve(settings, host=args.host, port=args.port, with_runner=not args.no_runner)
    elif args.command == "runner":
        api.run_runner(settings)
    elif args.keys_command == "create":
        key = api.new_key(settings, args.tenant)
        print(f"API key for tenant {args.tenant!r} (shown once; keep it secret):")
        print(key)
    elif not api.drop_key(settings, args.key):
        raise UsageError("no active key matches")
    return {}


def _add_export_command(commands: Any) -> None:
    export = commands.add_parser("export", help="write a trial's plan as a checkpoint directory")
    export.add_argument("--storage", default=None, help="database URL of the study (default: sqlite file here)")
    export.add_argument("--study", required=True, help="the search's study name")
    export.add_argument("--trial", default="best", help="'best' (default) or a trial number")
    export.add_argument("--out", required=True, type=Path, help="a new directory to write")
    export.add_argument("--format", default="native", choices=["native", "compressed-tensors"])
    export.add_argument(
        "--densify-sparse",
        action="store_true",
        help="compressed-tensors: store sparse units as dense weights with zeros where pruned",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    export.add_argument("--no-verify", action="store_true", help="skip reloading the export and measuring its KL again")
    export.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    export.add_argument("-v", "--verbose", action="store_true")


def _export_summary(number: int, args: argparse.Namespace, result: dict[str, Any]) -> str:
    disk, model = result["weight_bytes_on_disk"], result["memory_model_weight_bytes"]
    lines = [
        f"exported trial {number} of study {args.study} as {result['format']} to {result['directory']}",
        *(f"  {name:<24} {entry['bytes']:>12,} bytes" for name, entry in result["files"].items()),
        f"weights on disk {disk:,} bytes; memory model {model:,} bytes ({disk / model - 1:+.2%})",
    ]
    if result["reloaded_kl"] is not None:
        lines.append(
            f"KL of the reloaded export {result['reloaded_kl']:.9g}; the trial's {result['evaluated_kl']:.9g} "
            f"(difference {result['kl_abs_diff']:.3g})"
        )
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"manifest sha256 {result['manifest_sha256']}")
    loader = "budgetpress.load_compressed" if result["format"] == "native" else "AutoModelForCausalLM.from_pretrained"
    lines.append(f"load it with {loader}({result['directory']!r})")
    return "\n".join(lines)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from budgetpress.workers import export_from_study

    which = "the best trial" if args.trial == "best" else f"trial {args.trial}"
    print(f"budgetpress: exporting {which} of study {args.study} as {args.format}", file=sys.stderr)
    number, exported = export_from_study(
        storage=args.storage or _default_storage(),
        study_name=args.study,
        trial=args.trial,
        out=args.out,
        export_format=args.format,
        verify=not args.no_verify,
        overwrite=args.overwrite,
        densify_sparse=args.densify_sparse,
    )
    result = {"study": args.study, "trial": number, **exported.to_dict()}
    if not args.json:
        print(_export_summary(number, args, result))
    return result


def _add_dashboard_commands(commands: Any) -> None:
    plot = commands.add_parser("plot", help="a study's Pareto front or best plan's per-layer allocation as PNG")
    plot.add_argument("--storage", default=None, help=_STORAGE_HELP)
    plot.add_argument("--study", required=True, help="the search's study name")
    plot.add_argument("--kind", default="pareto", choices=["pareto", "allocation"])
    plot.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    plot.add_argument("--attach", action="store_true", help="also attach both plots to the study (dashboard artifacts)")
    plot.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    dash = commands.add_parser("dashboard", help="optuna-dashboard on the database, read-only, on 127.0.0.1")
    dash.add_argument("--storage", default=None, help=_STORAGE_HELP)
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless --expose)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--artifacts", type=Path, default=None, help="plot artifacts (default: beside the database)")
    dash.add_argument("--expose", action="store_true", help="allow a non-loopback --host (a private network only)")
    dash.add_argument("-v", "--verbose", action="store_true")


def _cmd_dashboard(args: argparse.Namespace) -> dict[str, Any]:
    import os

    from budgetpress import dashboard

    storage = args.storage or os.environ.get("BUDGETPRESS_DATABASE_URL") or _default_storage()
    if args.command == "dashboard":
        root = args.artifacts or dashboard.artifact_root_for(storage)
        print(f"optuna-dashboard (read-only) on http://{args.host}:{args.port}/dashboard/", file=sys.stderr, flush=True)
        dashboard.serve_dashboard(storage, host=args.host, port=args.port, artifact_root=root, expose=args.expose)
        return {}
    from budgetpress.workers._export_job import load_study

    study = load_study(storage, args.study)
    data = dashboard.study_plot(study, args.kind)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    result: dict[str, Any] = {"study": args.study, "kind": args.kind, "out": str(args.out), "bytes": len(data)}
    if args.attach:
        root = dashboard.artifact_root_for(storage)
        result["artifacts"] = dashboard.attach_plots(study, root)
        result["artifact_root"] = str(root)
    if not args.json:
        print(f"wrote the {args.kind} plot of study {args.study} to {args.out} ({len(data):,} bytes)")
        for kind, artifact in result.get("artifacts", {}).items():
            print(f"attached the {kind} plot as artifact {artifact} under {result['artifact_root']}")
    return result


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "search":
        return _cmd_search(args)
    if args.command == "export":
        return _cmd_export(args)
    if args.command in ("plot", "dashboard"):
        return _cmd_dashboard(args)
    if args.command in ("serve", "runner", "keys"):
        return _cmd_service(args)
    if args.model_command == "train-builtin":
        return _cmd_train(args)
    return _cmd_info(args)


def main(argv: Sequence[str] | None = None) -> int:
    from budgetpress.evaluators import ModelLoadError

    started = time.monotonic()
    try:
        args = _build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO
            if getattr(args, "verbose", False) or args.command in ("serve", "runner")
            else logging.WARNING,
            stream=sys.stderr,
            format="%(levelname)s %(name)s: %(message)s",
        )
        output = _run(args)
    except (UsageError, ValueError, ModelLoadError) as error:
        print(f"budgetpress: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:
        logging.getLogger(__name__).debug("search failed", exc_info=True)
        print(f"budgetpress: failed: {_one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps({**output, "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
