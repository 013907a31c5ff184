"""The data and training commands: check the inputs, start Prefect's API, run one flow, report.
Each checks what it can before anything starts, so a typo costs a second, not a server start; while
the flow runs the terminal shows progress, and the libraries' logs go to the command's log file."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from flows.orchestration import orchestrated, start_api
from interfaces import console
from interfaces.flags import check_encoder, columns, run_config


class FlowRun:
    """One command's flow call: ``run(flow, *args, **kwargs)`` loads what the flow will need while
    Prefect's API boots, waits for the API and calls the flow under the command's tags; ``log`` is
    the command's log file (None with --verbose)."""

    def __init__(self, log: Path | None, trains: bool = False, table: bool = False):
        self.log, self.trains, self.table = log, trains, table

    def __call__(self, flow, *args, **kwargs):
        # Loaded now, before waiting for Prefect's API: the wait would be idle time, and the flow
        # loads them anyway. Not on a thread: a thread importing MLflow while a task imported it too
        # broke MLflow's own imports ("Couldn't build proto file into descriptor pool").
        if self.table:
            import lancedb  # noqa: F401 - ~1.2 s
        if self.trains:
            warm_up()
        with orchestrated():
            return flow(*args, **kwargs)


@contextlib.contextmanager
def flow_run(a, trains: bool = False, table: bool = False) -> Iterator[FlowRun]:
    """After the inputs are checked: stderr to the log file (unless --verbose) and Prefect's API
    starting. ``trains``: the flow trains (MLflow's store and torch's optimizer imports are loaded
    while the API boots); ``table``: it opens a LanceDB table. Import the flow inside, then call it
    through the ``FlowRun`` this yields."""
    with console.captured(a.command, getattr(a, "verbose", False)) as log:
        start_api()
        yield FlowRun(log, trains, table)


def warm_up() -> None:
    """Open the MLflow store (its tables made on first use) and import what torch's optimizers load
    on first use: a second or two each that the training stage would otherwise spend. A failure
    here is left for the stage that needs the piece to raise, with its own message."""
    try:
        import torch._dynamo  # noqa: F401 - the first optimizer constructed imports it

        from tasks import registry

        registry.configure()
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def done(run: FlowRun) -> None:
    """The summary's last line: time taken and the log file."""
    print(console.footer(run.log))


def preflight(paths: list[str], strict: bool, flag: str = "--data", cols=None) -> None:
    """Fail on a path that is missing, a folder, unreadable, empty or without one usable record (or,
    with --strict, on the first bad one), or a table without the named columns, before anything is
    started or written: a typo should cost a second, not a server start and two tracebacks."""
    from conversations.dataset import is_dataset
    from conversations.records import check_input, iter_records, require_pairs

    for path in paths:
        if is_dataset(path):  # an earlier stage's output: checked when it was written
            check_input(path, flag)
        elif strict:
            for _ in iter_records(path, strict=True, columns=cols, flag=flag):
                pass
            require_pairs(path, flag, cols)
        else:
            require_pairs(path, flag, cols)


def report_rejects(result: dict) -> None:
    n = result.get("rejected_lines") or 0
    if n:
        print(f"{n} malformed line(s) skipped; see {result.get('rejects')}", file=sys.stderr)


def cmd_expand(a) -> None:
    cols = columns(a)
    preflight([a.input], a.strict, "--input", cols)
    with flow_run(a) as run:
        from flows.expand import expand_flow

        r = run(expand_flow, a.input, a.output, a.target, a.creative_prob, a.blend_prob, a.seed, a.strict, cols)
    report_rejects(r)
    print(f"wrote {r['records']} records ({r['records'] - r['input_records']} new) to {r['jsonl']} and {r['parquet']}")
    dropped = r["inconsistent_variants"]
    print(
        f"variants dropped by the consistency check: {sum(dropped.values())}"
        + (f" ({', '.join(f'{n} {k}' for k, n in sorted(dropped.items()))})" if dropped else "")
    )
    done(run)


def cmd_build_super(a) -> None:
    cols = columns(a)
    preflight(a.inputs, a.strict, "--inputs", cols)
    with flow_run(a) as run:
        from flows.build_super import build_super_flow

        r = run(
            build_super_flow,
            a.inputs,
            a.output,
            a.target,
            a.creative_prob,
            a.blend_prob,
            a.seed,
            a.strict,
            a.near_dup_threshold,
            columns=cols,
        )
    report_rejects(r)
    print(f"wrote {r['records']} records to {r['jsonl']} and {r['parquet']}")
    print(
        "dropped: "
        + (", ".join(f"{n} {reason}" for reason, n in sorted(r["dropped"].items())) or "nothing")
        + f" (records in {r['rejects']}, counts in {r['report']})"
    )
    done(run)


def cmd_db(a) -> None:
    if a.db_command == "build":
        cols = columns(a)
        preflight([a.data], a.strict, "--data", cols)
        check_encoder(a)
        with flow_run(a, table=True) as run:
            from flows.build_db import build_db_flow

            check_dask(a)
            r = run(
                build_db_flow,
                a.data,
                a.db,
                a.table,
                a.num_buckets,
                a.seed,
                a.device,
                a.strict,
                cols,
                a.encoder,
                a.dask_workers,
                a.dask_address,
            )
        report_rejects(r)
        print(f"table {r['table']} in {r['db']}: version {r['version']}, {r['rows']} rows, {r['embedded']} newly embedded")
        if a.dask_workers or a.dask_address:
            print(f"embedded on the Dask cluster: {r['embedded_on_cluster']} messages")
        print("rows per bucket: " + ", ".join(f"{b}: {n}" for b, n in r["buckets"].items()))
        done(run)
        return
    from retrieval.store import stats

    s = stats(a.db, a.table)
    if a.json:
        print(json.dumps(s, indent=2))
        return
    print(f"table {s['table']} in {s['db']}: version {s['version']}, {s['rows']} rows, {s['embedding_cache']} cached embeddings")
    print("buckets:")
    for b, v in s["buckets"].items():
        print(f"  {b:>3}  {v['rows']:>7} rows  {v['groups']:>5} groups")
    print("sources:")
    for src, n in s["sources"].items():
        print(f"  {src}: {n}")
    print("versions: " + ", ".join(f"v{v['version']} ({v['rows']} rows)" for v in s["versions"]))
    print("indices:")
    for i in s["indices"]:
        print(f"  {i['name']}: {i['type']} on {', '.join(i['columns'])}, {i['indexed_rows']} indexed, {i['unindexed_rows']} unindexed")


def check_dask(a) -> None:
    if a.dask_workers < 0:
        raise ValueError(f"--dask_workers must be 0 (this process) or a number of worker processes, got {a.dask_workers}")
    if a.dask_workers and a.dask_address:
        raise ValueError("--dask_workers starts a local cluster and --dask_address names a running one; pass one of them")


def check_weights(spec: str | None) -> None:
    if spec and not spec.startswith(("models:/", "runs:/")) and not Path(spec).is_file():
        raise FileNotFoundError(
            f"--weights {spec!r} does not exist; pass a checkpoint written by `bucketchat finetune` or a models:/bucketchat/N URI"
        )


def cmd_finetune(a) -> None:
    train, head = run_config(a)
    check_weights(a.weights)
    cols = columns(a)
    preflight([a.data] if a.data else [], a.strict, "--data", cols)
    check_encoder(a)
    with flow_run(a, trains=True, table=True) as run:
        from flows.finetune import finetune_flow

        r = run(
            finetune_flow,
            a.db,
            data=a.data,
            table=a.table,
            table_version=a.table_version,
            train=train,
            head=head,
            output=a.output,
            meta=a.meta,
            strict=a.strict,
            weights=a.weights,
            resume=a.resume,
            force=a.force,
            model_name=a.model_name,
            replace_champion=a.replace_champion,
            columns=cols,
            encoder=a.encoder,
        )
    report_training(r, a.model_name)
    print(f"local checkpoint: {a.output} + {a.meta}")
    done(run)


def cmd_size_sweep(a) -> None:
    train, head = run_config(a, sweep=True)
    preflight([a.data] if a.data else [], False)
    with flow_run(a, trains=True, table=True) as run:
        from flows.size_sweep import size_sweep_flow

        r = run(
            size_sweep_flow,
            a.db,
            data=a.data,
            table=a.table,
            table_version=a.table_version,
            sizes=a.sizes,
            train=train,
            head=head,
            model_name=a.model_name,
            replace_champion=a.replace_champion,
        )
    print(f"table {r['table']['name']} v{r['table']['version']}:")
    print(f"  {'size':<8} {'val response acc':>16} {'examples/s':>11}  registered")
    for size, v in r["sizes"].items():
        reg = v["registry"]
        acc = f"{v['val_response_acc']:.4f}" if v["val_response_acc"] is not None else "n/a"
        print(f"  {size:<8} {acc:>16} {v['examples_per_second']:>11.0f}  v{reg['version']}{' (champion)' if reg['promoted'] else ''}")
    print("compare the runs in the MLflow UI: see README, 'Compare model sizes in MLflow'")
    done(run)


def cmd_registry(a) -> None:
    from tasks import registry

    if a.registry_command == "rollback":
        before, after = registry.rollback(a.version, a.model_name)
        print(f"champion: v{before} -> v{after}")
        return
    versions = registry.list_versions(a.model_name)
    if a.json:
        print(json.dumps(versions, indent=2))
        return
    if not versions:
        print(f"no versions of {a.model_name!r} registered yet; run `bucketchat pipeline --data FILE --model_name {a.model_name}`")
        return
    print(f"{'version':>7}  {'aliases':<10} {'size':<8} {'val acc':>8} {'bucket acc':>10} {'table':>6}  run")

    def acc(x: float | None) -> str:
        return f"{x:.4f}" if x is not None else "n/a"

    for v in versions:
        print(
            f"{v['version']:>7}  {','.join(v['aliases']) or '-':<10} {v['model_size'] or '?':<8} {acc(v['val_response_acc']):>8} {acc(v['val_bucket_acc']):>10} {('v' + v['table_version']) if v['table_version'] else '?':>6}  {v['run_id']}"
        )


def report_training(r: dict, name: str) -> None:
    t, reg = r["train"], r["registry"]
    acc = t["val_response_acc"]
    where = f"{r['table']['name']} v{r['table']['version']}"
    ws = t.get("warm_start")
    if ws:
        print(
            f"warm start from {ws['source']}: {len(ws['matched'])} tensors matched, {len(ws['remapped'])} remapped by response text, {len(ws['new'])} new"
            + (f", {len(ws['skipped'])} skipped: {'; '.join(ws['skipped'])}" if ws["skipped"] else ", none skipped")
        )
    if t.get("resumed_from_epoch"):
        print(f"resumed after epoch {t['resumed_from_epoch']}")
    if t.get("skipped"):
        print(f"{where}: {reg['reason']} (--force trains anyway)")
        print(f"MLflow run {t['run_id']}; {name} v{reg['version']} stays as it was")
        return
    speed = (t.get("metrics") or {}).get("examples_per_second")
    speed = f", {speed:,.0f} examples/s" if speed else ""
    print(
        f"trained on {where}: validation response accuracy {acc:.4f}{speed}"
        if acc is not None
        else f"trained on {where} (no validation rows){speed}"
    )
    print(
        f"MLflow run {t['run_id']}; registered {name} v{reg['version']}: {'CHAMPION' if reg['promoted'] else 'not promoted'} ({reg['reason']})"
    )


def report_table(b: dict) -> None:
    print(
        f"table: {b['db']} version {b['version']} ({b['rows']} rows, "
        + ("unchanged: no new version written)" if b.get("reused") else f"{b['embedded']} newly embedded)")
    )


def cmd_pipeline(a) -> None:
    train, head = run_config(a)
    cols = columns(a)
    preflight(a.data, a.strict, "--data", cols)
    check_weights(a.weights)
    check_encoder(a)
    check_dask(a)
    with flow_run(a, trains=True, table=True) as run:
        from flows.pipeline import pipeline_flow

        r = run(
            pipeline_flow,
            a.data,
            workdir=a.workdir,
            target=a.target,
            creative_prob=a.creative_prob,
            blend_prob=a.blend_prob,
            seed=a.seed,
            train=train,
            head=head,
            strict=a.strict,
            near_dup_threshold=a.near_dup_threshold,
            weights=a.weights,
            resume=a.resume,
            force=a.force,
            db=a.db,
            model_name=a.model_name,
            replace_champion=a.replace_champion,
            columns=cols,
            encoder=a.encoder,
            dask_workers=a.dask_workers,
            dask_address=a.dask_address,
        )
    d = r["dataset"]
    if d["rejected_lines"]:
        print(f"{d['rejected_lines']} malformed line(s) skipped; see {d['rejects']}", file=sys.stderr)
    print(
        f"dataset: {d['records']} pairs ({d['duplicates']} duplicates and {d['low_quality']} low-quality dropped, {d.get('near_duplicates_linked', 0)} near duplicates kept with their twin) -> {d['parquet']}"
    )
    report_table(r["build"])
    report_training(r, a.model_name)
    print(f"workdir: {r['workdir']}")
    done(run)


def cmd_retrain(a) -> None:
    folder = Path(a.data_dir)
    if not folder.is_dir():
        raise ValueError(f"--data_dir {a.data_dir!r} is not a folder; pass the folder the data drops (*.jsonl) are put in")
    check_encoder(a)
    with flow_run(a, trains=True, table=True) as run:
        from flows.retrain import retrain_flow

        r = run(
            retrain_flow, a.data_dir, a.workdir, a.target, force=a.force, model_name=a.model_name, columns=columns(a), encoder=a.encoder
        )
    print(f"{len(r['drops'])} drop(s) in {a.data_dir}; dataset {r['dataset']['records']} pairs")
    report_table(r["build"])
    report_training(r, a.model_name)
    done(run)
