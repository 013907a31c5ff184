"""Every benchmark in the repo, one after another, into one Markdown report with PNG plots.

    make bench                       # = python tests/bench/report.py
    python tests/bench/report.py [--repeats 3] [--out bench-report] [--only quality latency ...]

Sections (each script runs in its own process; its JSON and log are kept under OUT/raw and OUT/logs):

- quality: BANKING77 full and 10-shot through `bucketchat pipeline` + `bucketchat chat` (accuracy.py),
  against TF-IDF + linear SVM, MiniLM nearest neighbour and MiniLM logistic regression (peers.py),
  all on the same train and test files in the same run; pipeline wall time and peak memory;
- latency: chat turns on a 100k-row table against SQLite FTS5 + numpy cosine (latency.py);
- training: head training throughput per size against scikit-learn's LogisticRegression fit,
  a --train_all epoch, db build rows/s, peak memory (training.py);
- data: expand 5k -> 120k and build-super over 260k records, time and peak memory (data.py);
- serving: requests/s of `bucketchat serve` against its /healthz ceiling (serve.py);
- retrain: `bucketchat retrain` cold, then on the unchanged folder (retrain.py);
- logging: per-step metric logging into MLflow, batched against MLflow's async logging (metric_logging.py);
- reliability: hostile text into the pipeline, piped chat and the server, and SIGINT, SIGTERM and
  SIGKILL into each long-running command: crashes, lost lines, leftover processes (reliability.py).

Each finished section also replaces its own block of BENCHMARKS.md (plots under benchmarks/), so a
partial run updates what it measured and leaves the rest. Figures are medians over --repeats with their min-max spread; ratios are against the baseline
measured in the same run. A section that fails is reported as failed, with its log, and the rest
still run. OUT (default bench-report/) is git-ignored. The whole report takes about an hour on 2 cores
with --repeats 3.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tests" / "bench"
DATA = ROOT.parent / "shared" / "data" / "banking77"
SECTIONS = ("quality", "latency", "training", "data", "serving", "retrain", "reliability", "logging", "startup")
# The code before the start-up work (issue 21): startup.py runs on it and on this checkout, interleaved.
STARTUP_REF = "cfd9cf4"


def run_script(out: Path, name: str, script: str, *args: str) -> dict | None:
    """Run one benchmark script with --json; returns its JSON, or None (the log says why)."""
    raw, logs = out / "raw", out / "logs"
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    target = raw / f"{name}.json"
    target.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        done = subprocess.run(
            [sys.executable, str(BENCH / script), *args, "--json", str(target)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    print(
        f"  {name}: {'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} in {time.perf_counter() - t0:.0f} s", flush=True
    )
    return json.loads(target.read_text()) if done.returncode == 0 and target.is_file() else None


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median (min-max) of repeated measurements."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def pct(x: float) -> str:
    return f"{x:.2%}"


class Report:
    def __init__(self, out: Path):
        self.out, self.lines, self.plots = out, [], []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), "")

    def plot(self, name: str, draw) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        draw(ax)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=110)
        plt.close(fig)
        self.add(f"![{name}]({name}.png)", "")

    def failed(self, what: str, log: str) -> None:
        self.add(f"**{what}: the benchmark failed**; see `logs/{log}.log`.", "")


def bars(ax, labels: list[str], groups: dict[str, list[list[float]]], ylabel: str, log: bool = False) -> None:
    """Grouped bars at the median with min-max whiskers; ``groups``: series -> per-label values."""
    import numpy as np

    width = 0.8 / max(1, len(groups))
    for i, (series, per_label) in enumerate(groups.items()):
        med = [statistics.median(v) if v else np.nan for v in per_label]
        lo = [m - min(v) if v else 0 for m, v in zip(med, per_label)]
        hi = [max(v) - m if v else 0 for m, v in zip(med, per_label)]
        ax.bar(np.arange(len(labels)) + i * width, med, width, yerr=[lo, hi], capsize=3, label=series)
    ax.set_xticks(np.arange(len(labels)) + width * (len(groups) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if len(groups) > 1:
        ax.legend(fontsize=8)


def quality(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Quality: BANKING77 response accuracy",
        "",
        "`bucketchat pipeline --data TRAIN` on defaults in a fresh workdir and store, then every test line through `bucketchat chat --json`; a fallback counts as wrong. The peers train on the same file and predict the response text. Same test file (3,080 lines), same run.",
        "",
    )
    names = {"full": "train.jsonl", "10shot": "train_10shot.jsonl"}
    results = {}
    for key, file in names.items():
        train = DATA / file
        results[key] = (
            run_script(out, f"accuracy-{key}", "accuracy.py", "--train", str(train), "--repeats", str(repeats)),
            run_script(out, f"peers-{key}", "peers.py", "--train", str(train), "--repeats", "1"),
        )
    rows, plot_groups = [], {"bucketchat": [], "TF-IDF + SVM": [], "MiniLM nearest neighbour": [], "MiniLM logistic regression": []}
    for key, (ours, peers) in results.items():
        if ours is None or peers is None:
            rep.failed(f"quality ({key})", f"accuracy-{key}" if ours is None else f"peers-{key}")
            for v in plot_groups.values():
                v.append([])
            continue
        acc = [r["accuracy"] for r in ours["runs"]]
        p = peers["summary"]
        best_peer = max(p[k]["accuracy"]["median"] for k in p)
        rows.append(
            [
                names[key],
                spread(acc, "{:.2%}"),
                pct(p["tfidf_svm"]["accuracy"]["median"]),
                pct(p["minilm_nearest_neighbour"]["accuracy"]["median"]),
                pct(p["minilm_logistic_regression"]["accuracy"]["median"]),
                f"{(statistics.median(acc) - best_peer) * 100:+.2f} pt",
                spread([r["accuracy_without_fallback"] for r in ours["runs"]], "{:.2%}"),
                spread([r["fallback_rate"] for r in ours["runs"]], "{:.2%}"),
                spread([r["pipeline_s"] for r in ours["runs"]], "{:.0f}") + " s",
                spread([r.get("pipeline_peak_rss_mb", float("nan")) for r in ours["runs"]], "{:.0f}") + " MB",
            ]
        )
        plot_groups["bucketchat"].append(acc)
        plot_groups["TF-IDF + SVM"].append([p["tfidf_svm"]["accuracy"]["median"]])
        plot_groups["MiniLM nearest neighbour"].append([p["minilm_nearest_neighbour"]["accuracy"]["median"]])
        plot_groups["MiniLM logistic regression"].append([p["minilm_logistic_regression"]["accuracy"]["median"]])
    if rows:
        rep.table(
            [
                "train file",
                f"bucketchat (median of {repeats}, range)",
                "TF-IDF+SVM",
                "MiniLM NN",
                "MiniLM LR",
                "vs best peer",
                "ranking alone",
                "fallbacks",
                "pipeline wall time",
                "pipeline peak RSS",
            ],
            rows,
        )
        rep.plot("quality", lambda ax: (bars(ax, [names[k] for k in results], plot_groups, "response accuracy"), ax.set_ylim(0.6, 1.0)))


def latency(rep: Report, out: Path) -> None:
    rep.add(
        "## Chat latency: 100k-row table",
        "",
        "1,000 BANKING77 test questions, one process, each turn timed through the engine; the baseline is SQLite FTS5 bm25 + numpy cosine over the same rows with the same encoder (latency.py). Percentiles are over the 1,000 turns.",
        "",
    )
    r = run_script(out, "latency", "latency.py")
    if r is None:
        return rep.failed("latency", "latency")
    lat, base = r["latency_ms"], r["latency_ms"].get("baseline")
    rows = []
    for name, row in lat.items():
        ratio = (
            f"{row['p50'] / base['p50']:.2f}× / {row['p99'] / base['p99']:.2f}×"
            if base and name != "baseline" and name in r["accuracy"]
            else ""
        )
        acc = pct(r["accuracy"][name]) if name in r["accuracy"] else ""
        rows.append([name, f"{row['p50']:.1f}", f"{row['p90']:.1f}", f"{row['p99']:.1f}", ratio, acc])
    rep.table(["engine / component", "p50 ms", "p90 ms", "p99 ms", "vs baseline (p50 / p99)", "accuracy"], rows)
    names = list(lat)
    rep.plot(
        "latency",
        lambda ax: bars(
            ax, names, {"p50": [[lat[n]["p50"]] for n in names], "p99": [[lat[n]["p99"]] for n in names]}, "ms per turn (log)", log=True
        ),
    )


def training(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Training and database build",
        "",
        "BANKING77 train (10,003 rows) in a temp table; each measurement in its own process, through the same code as `bucketchat finetune` (training.py). Examples/s counts training rows per second of epoch time. The baseline is scikit-learn's LogisticRegression fit on the same vectors (wall time for the whole fit).",
        "",
    )
    r = run_script(out, "training", "training.py", "--repeats", str(repeats))
    if r is None:
        return rep.failed("training", "training")
    lr = [b["fit_s"] for b in r["baseline"]]
    rows = [
        [
            size,
            spread([x["examples_per_second"] for x in runs], "{:,.0f}"),
            spread([x["fit_s"] for x in runs]) + " s",
            f"{statistics.median(x['fit_s'] for x in runs) / statistics.median(lr):.2f}×",
            f"{max(x['peak_rss_mb'] for x in runs):.0f} MB",
        ]
        for size, runs in r["heads"].items()
    ]
    rows.append(["LogisticRegression (baseline)", "", spread(lr) + " s", "1×", f"{max(b['peak_rss_mb'] for b in r['baseline']):.0f} MB"])
    rep.table(["head size", "examples/s", "whole fit", "fit vs LR", "peak RSS"], rows)
    extra = []
    if "build_s" in r:
        extra.append(
            f"- database build (embed + bucket + LanceDB write + indices): {r['rows']:,} rows in {r['build_s']:.1f} s = **{r['rows'] / r['build_s']:,.0f} rows/s**"
        )
    if r.get("train_all"):
        t = r["train_all"]
        extra.append(
            f"- `--train_all`: one epoch of {t['rows']:,} rows in {t['epoch_s']:.0f} s ({t['examples_per_second']:.0f} examples/s), peak RSS {t['peak_rss_mb']:.0f} MB"
        )
    rep.add(*extra, "")
    heads = r["heads"]
    rep.plot(
        "training",
        lambda ax: bars(
            ax,
            list(heads),
            {"examples/s": [[x["examples_per_second"] for x in runs] for runs in heads.values()]},
            "examples/s (frozen encoder)",
        ),
    )


def data(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Data stages",
        "",
        "`bucketchat expand` 5,000 → 120,000 and `bucketchat build-super` over three inputs totalling 260,000 records, each in its own process (data.py).",
        "",
    )
    r = run_script(out, "data", "data.py", "--repeats", str(repeats))
    if r is None:
        return rep.failed("data", "data")
    res = r["results"]
    n = {"expand": 120_000, "build-super": 260_000}
    rep.table(
        ["stage", "time", "records/s", "peak RSS"],
        [[k, spread(v["s"]) + " s", f"{n[k] / statistics.median(v['s']):,.0f}", spread(v["mb"], "{:.0f}") + " MB"] for k, v in res.items()],
    )


def serving(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Serving",
        "",
        "`bucketchat serve` on loopback, 8 keep-alive clients, BANKING77 questions against the 100k-row model; the ceiling is the same server's `/healthz` (serve.py).",
        "",
    )
    r = run_script(out, "serving", "serve.py", "--repeats", str(repeats))
    if r is None:
        return rep.failed("serving", "serving")
    chat, health = [x["rps"] for x in r["chat"]], [x["rps"] for x in r["healthz"]]
    rep.table(
        ["endpoint", "requests/s", "errors", "p50 ms", "p99 ms", "vs /healthz"],
        [
            [
                "chat completions",
                spread(chat, "{:.0f}"),
                str(sum(x["errors"] for x in r["chat"])),
                spread([x["p50_ms"] for x in r["chat"]]),
                spread([x["p99_ms"] for x in r["chat"]]),
                f"{statistics.median(chat) / statistics.median(health):.2f}×",
            ],
            ["/healthz (ceiling)", spread(health, "{:.0f}"), str(sum(x["errors"] for x in r["healthz"])), "", "", "1×"],
        ],
    )


def retrain(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Incremental retraining",
        "",
        "`bucketchat retrain` on a folder holding BANKING77 train, cold, then rerun on the unchanged folder: no table version written, nothing trained (retrain.py).",
        "",
    )
    r = run_script(out, "retrain", "retrain.py", "--repeats", str(repeats))
    if r is None:
        return rep.failed("retrain", "retrain")
    rep.table(
        ["run", "time", "vs cold"],
        [
            ["cold", f"{r['cold_s']:.0f} s", "1×"],
            ["unchanged rerun", spread(r["unchanged_s"]) + " s", f"{statistics.median(r['unchanged_s']) / r['cold_s']:.2f}×"],
        ],
    )


def reliability(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Reliability",
        "",
        "Seeded hostile inputs (any Unicode with lone surrogates, NUL and control characters, byte-order marks, CRLF, Latin-1 lines, random bytes, lines over the limits) into each entry point through the real commands, and signals into each long-running command mid-run (reliability.py). A crash is a non-zero exit or a traceback (pipeline, chat) or a 500 or dropped connection (server); a lost line is one neither answered nor reported/rejected.",
        "",
    )
    r = run_script(out, "reliability", "reliability.py")
    if r is None:
        return rep.failed("reliability", "reliability")
    rows = []
    for name, f in r["fuzz"].items():
        if name == "pipeline (file)":
            detail = f"{f.get('kept_pairs', '?')} pairs kept, {f.get('rejected_lines', '?')} lines rejected, {f.get('dropped_pairs', '?')} pairs dropped"
        elif name == "chat (piped)":
            detail = f"{f['answered']} answered, {f['reported']} reported per line"
        else:
            detail = ", ".join(f"{n}× {code}" for code, n in f["statuses"].items())
        rows.append([name, f"{f['inputs']:,}", str(f["crashes"]), str(f["lost"]), detail, f"{f['s']:.0f} s"])
    rep.table(["entry point", "inputs", "crashes", "lost lines", "outcome", "time"], rows)
    sig_rows = [
        [
            x["command"],
            x["signal"],
            f"{x['stop_s']:.2f} s" if "stop_s" in x else "-",
            str(x.get("exit", "-")),
            "yes" if x.get("traceback") else "no",
            str(x.get("leftover_processes", "-")),
            ", ".join(sorted(set(x.get("flow_runs") or x.get("flow_runs_after_next_command") or []))) or "-",
            "ok" if x["ok"] else f"FAILED {x.get('why', '')}",
        ]
        for x in r["signals"]
    ]
    rep.table(["command", "signal", "stopped in", "exit", "traceback", "processes left", "its flow runs", "verdict"], sig_rows)
    crashes = sum(f["crashes"] for f in r["fuzz"].values())
    lost = sum(f["lost"] or 0 for f in r["fuzz"].values())
    rep.add(
        f"Totals: {sum(f['inputs'] for f in r['fuzz'].values()):,} hostile inputs, **{crashes} crashes, {lost} lost lines**; {len(r['signals'])} signals, **{sum(not x['ok'] for x in r['signals'])} failed checks, {sum(x.get('leftover_processes') or 0 for x in r['signals'])} leftover processes**.",
        "",
    )


def logging_cost(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Metric logging",
        "",
        "Per-step training metrics into a fresh SQLite MLflow store: `MetricBuffer` (batched `log_batch`) against MLflow's own asynchronous logging, interleaved (metric_logging.py).",
        "",
    )
    r = run_script(out, "logging", "metric_logging.py", "--repeats", str(repeats))
    if r is None:
        return rep.failed("metric logging", "logging")
    rep.table(
        ["way", f"seconds for {r['steps']:,} steps x {r['metrics_per_step']}", "vs MetricBuffer"],
        [[k, f"{v:.2f}", f"{r['ratio_to_buffer'][k]:.1f}×"] for k, v in r["median_s"].items()],
    )


def startup(rep: Report, out: Path, repeats: int) -> None:
    rep.add(
        "## Start-up: what a command costs before its job",
        "",
        f"Each figure a fresh `bucketchat` process from its start, medians of {max(5, repeats)}: the code before the start-up work ({STARTUP_REF}) and this checkout, interleaved (`python tests/bench/compare.py {STARTUP_REF} startup.py --this-script -- --repeats N`). The sample's pipeline runs on a new workdir and MLflow store (encoder cache and Prefect's home made; \"first\" is the run that makes Prefect's home); chat is `chat --json` with one piped message, to its answer; serve is to the first 200 from `/healthz`.",
        "",
    )
    target = out / "raw" / "startup.json"
    for folder in ("raw", "logs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / "startup.log", "w") as log:
        done = subprocess.run(
            [sys.executable, str(BENCH / "compare.py"), STARTUP_REF, "startup.py", "--this-script", "--repeats", "1", "--json", str(target)]
            + ["--", "--repeats", str(max(5, repeats))],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0 or not target.is_file():
        return rep.failed("start-up", "startup")
    figures = json.loads(target.read_text())["figures"]
    names = {
        "arg_error_s": "argument error (missing --data)",
        "pipeline_s": "sample pipeline",
        "pipeline_first_s": "sample pipeline, first (makes Prefect's home)",
        "chat_first_answer_s": "chat: first answer",
        "serve_ready_s": "serve: ready",
    }
    rep.table(
        ["command", f"before ({STARTUP_REF}), s", "after, s", "after ÷ before"],
        [[label, f"{figures[k]['before']:.2f}", f"{figures[k]['after']:.2f}", f"{figures[k]['ratio']:.2f}×"] for k, label in names.items()],
    )


def update_benchmarks(rep: Report, sections: dict[str, tuple[int, int]], commit: str) -> None:
    """Rewrite the measured sections of BENCHMARKS.md in place (the others stay as they were), with
    their plots copied under benchmarks/."""
    import re
    import shutil

    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text()
    plots = ROOT / "benchmarks"
    plots.mkdir(exist_ok=True)
    stamp = f"_Measured {dt.datetime.now(dt.UTC):%Y-%m-%d} at commit {commit}, {platform.machine()}, {os.cpu_count()} cores._"
    for name, (start, end) in sections.items():
        body = []
        for line in rep.lines[start:end]:
            m = re.fullmatch(r"!\[(.+)\]\((.+\.png)\)", line)
            if m:
                shutil.copyfile(rep.out / m.group(2), plots / m.group(2))
                line = f"![{m.group(1)}](benchmarks/{m.group(2)})"
            body.append(line)
        block = f"<!-- section:{name} -->\n" + "\n".join(body).rstrip() + f"\n\n{stamp}\n<!-- /section:{name} -->"
        pattern = re.compile(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->", re.S)
        text = pattern.sub(lambda _, block=block: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench-report")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--no-update", action="store_true", help="write only OUT/REPORT.md, leave BENCHMARKS.md as it is")
    a = p.parse_args()
    if not (DATA / "train.jsonl").is_file():
        sys.exit(f"{DATA} not found; the benchmarks need ../shared/data/banking77 beside the checkout")
    a.out.mkdir(parents=True, exist_ok=True)
    rep = Report(a.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "?"
    dirty = (
        " (uncommitted changes)"
        if subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        else ""
    )
    rep.add(
        "# bucketchat benchmark report",
        "",
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC · commit {commit}{dirty} · {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} · repeats {a.repeats}",
        "",
        "Medians with their min–max range over repeats; ratios are against the baseline measured in the same run.",
        "",
    )
    t0 = time.perf_counter()
    sections = {}
    for name in a.only:
        print(f"{name}:", flush=True)
        start = len(rep.lines)
        fn = {
            "quality": quality,
            "latency": latency,
            "training": training,
            "data": data,
            "serving": serving,
            "retrain": retrain,
            "reliability": reliability,
            "logging": logging_cost,
            "startup": startup,
        }[name]
        fn(rep, a.out) if name == "latency" else fn(rep, a.out, a.repeats)
        (a.out / "REPORT.md").write_text("\n".join(rep.lines) + "\n")  # after each section: a partial report survives a crash
        sections[name] = (start, len(rep.lines))
        if not a.no_update:
            update_benchmarks(rep, {name: sections[name]}, commit + dirty)
    rep.add(f"_Total benchmark time: {(time.perf_counter() - t0) / 60:.0f} min._")
    (a.out / "REPORT.md").write_text("\n".join(rep.lines) + "\n")
    print(f"report: {a.out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
