"""The data and training commands: check the inputs, start Prefect's API, run one flow, report.
Each checks what it can before anything starts, so a typo costs a second, not a server start."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.orchestration import orchestrated, start_api
from interfaces.flags import run_config


def preflight(paths: list[str], strict: bool, flag: str = "--data") -> None:
    """Fail on a path that is missing, a folder, unreadable, empty or without one usable line (or,
    with --strict, on the first bad line) before anything is started or written: a typo should cost
    a second, not a server start and two tracebacks."""
    from conversations.records import iter_records, require_pairs

    for path in paths:
        if Path(path).suffix == ".parquet":
            from conversations.records import check_input

            check_input(path, flag)
        elif strict:
            for _ in iter_records(path, strict=True):
                pass
            require_pairs(path, flag)
        else:
            require_pairs(path, flag)


def report_rejects(result: dict) -> None:
    n = result.get("rejected_lines") or 0
    if n:
        print(f"{n} malformed line(s) skipped; see {result.get('rejects')}", file=sys.stderr)


def cmd_expand(a) -> None:
    preflight([a.input], a.strict, "--input")
    start_api()
    from flows.expand import expand_flow

    with orchestrated():
        r = expand_flow(a.input, a.output, a.target, a.creative_prob, a.blend_prob, a.seed, a.strict)
    report_rejects(r)
    print(f"wrote {r['records']} records ({r['records'] - r['input_records']} new) to {r['jsonl']} and {r['parquet']}")
    dropped = r["inconsistent_variants"]
    print(
        f"variants dropped by the consistency check: {sum(dropped.values())}"
        + (f" ({', '.join(f'{n} {k}' for k, n in sorted(dropped.items()))})" if dropped else "")
    )


def cmd_build_super(a) -> None:
    preflight(a.inputs, a.strict, "--inputs")
    start_api()
    from flows.build_super import build_super_flow

    with orchestrated():
        r = build_super_flow(a.inputs, a.output, a.target, a.creative_prob, a.blend_prob, a.seed, a.strict, a.near_dup_threshold)
    report_rejects(r)
    print(f"wrote {r['records']} records to {r['jsonl']} and {r['parquet']}")
    print(
        "dropped: "
        + (", ".join(f"{n} {reason}" for reason, n in sorted(r["dropped"].items())) or "nothing")
        + f" (records in {r['rejects']}, counts in {r['report']})"
    )


def cmd_db(a) -> None:
    if a.db_command == "build":
        preflight([a.data], a.strict)
        start_api()
        from flows.build_db import build_db_flow

        with orchestrated():
            r = build_db_flow(a.data, a.db, a.table, a.num_buckets, a.seed, a.device, a.strict)
        report_rejects(r)
        print(f"table {r['table']} in {r['db']}: version {r['version']}, {r['rows']} rows, {r['embedded']} newly embedded")
        print("rows per bucket: " + ", ".join(f"{b}: {n}" for b, n in r["buckets"].items()))
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


def check_weights(spec: str | None) -> None:
    if spec and not spec.startswith(("models:/", "runs:/")) and not Path(spec).is_file():
        raise FileNotFoundError(
            f"--weights {spec!r} does not exist; pass a checkpoint written by `bucketchat finetune` or a models:/bucketchat/N URI"
        )


def cmd_finetune(a) -> None:
    train, head = run_config(a)
    check_weights(a.weights)
    preflight([a.data] if a.data else [], a.strict)
    start_api()
    from flows.finetune import finetune_flow

    with orchestrated():
        r = finetune_flow(
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
            progress=sys.stderr.isatty(),
            force=a.force,
            model_name=a.model_name,
            replace_champion=a.replace_champion,
        )
    report_training(r, a.model_name)
    print(f"local checkpoint: {a.output} + {a.meta}")


def cmd_size_sweep(a) -> None:
    train, head = run_config(a, sweep=True)
    preflight([a.data] if a.data else [], False)
    start_api()
    from flows.size_sweep import size_sweep_flow

    with orchestrated():
        r = size_sweep_flow(
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
    print("compare the runs in the MLflow UI: see README, 'Comparing model sizes'")


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
    print(f"trained on {where}: validation response accuracy {acc:.4f}" if acc is not None else f"trained on {where} (no validation rows)")
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
    preflight(a.data, a.strict)
    check_weights(a.weights)
    start_api()
    from flows.pipeline import pipeline_flow

    with orchestrated():
        r = pipeline_flow(
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


def cmd_retrain(a) -> None:
    folder = Path(a.data_dir)
    if not folder.is_dir():
        raise ValueError(f"--data_dir {a.data_dir!r} is not a folder; pass the folder the data drops (*.jsonl) are put in")
    start_api()
    from flows.retrain import retrain_flow

    with orchestrated():
        r = retrain_flow(a.data_dir, a.workdir, a.target, force=a.force, model_name=a.model_name)
    print(f"{len(r['drops'])} drop(s) in {a.data_dir}; dataset {r['dataset']['records']} pairs")
    report_table(r["build"])
    report_training(r, a.model_name)
