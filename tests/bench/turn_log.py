"""What the conversation log costs: a chat turn's latency with and without it, and its size on disk
per 100k turns.

    python tests/bench/turn_log.py [--model WEIGHTS META] [--turns 2000] [--repeats 3] [--json OUT]

Latency: ``ChatEngine.answer`` on the questions of ../shared/data/banking77/test.jsonl (cycled),
with the log off and on, alternating in blocks of 200 turns so a busy spell hits both; p50 and p99
of each. Default model: the sample pipeline's under .bucketchat/bench-turn-log (made on first use).
Size: 100k turns of those questions recorded and sealed into Parquet (the JSONL segment the writer
keeps before sealing is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77"


def sample_model() -> tuple[str, str]:
    work = ROOT / ".bucketchat" / "bench-turn-log"
    weights, meta = work / "champion_model_chat_ft.pth", work / "chat_model_meta.json"
    if not meta.is_file():
        env = {**os.environ, "BUCKETCHAT_HOME": str(work / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        subprocess.run(
            [
                Path(sys.executable).parent / "bucketchat",
                "pipeline",
                "--data",
                str(ROOT / "conversation_data.sample.jsonl"),
                "--workdir",
                str(work),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    return str(weights), str(meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=2, metavar=("WEIGHTS", "META"))
    p.add_argument("--turns", type=int, default=2000, help="turns per side and repeat (default 2000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    from retrieval.answer import ChatEngine
    from retrieval.turn_log import TurnLog, read_turns

    questions = [json.loads(l)["user"] for l in (DATA / "test.jsonl").read_text().splitlines() if l.strip() and '"user"' in l]
    engine = ChatEngine(*(a.model or sample_model()))
    engine.answer("warm-up")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            log = TurnLog(Path(tmp) / f"lat-{r}", model="bench", table="t", table_version=1, source="chat")
            off, on = [], []
            for start in range(0, a.turns, 200):
                for side, times in ((None, off), (log, on)):
                    engine.turn_log = side
                    for i in range(start, min(a.turns, start + 200)):
                        t0 = time.perf_counter()
                        engine.answer(questions[i % len(questions)])
                        times.append((time.perf_counter() - t0) * 1000)
            engine.turn_log = None
            log.close()
            row = {
                "p50_off_ms": float(np.percentile(off, 50)),
                "p50_on_ms": float(np.percentile(on, 50)),
                "p99_off_ms": float(np.percentile(off, 99)),
                "p99_on_ms": float(np.percentile(on, 99)),
            }
            runs.append(row)
            print(f"[{r + 1}/{a.repeats}] " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        # Size: 100k turns as chat records them (real answers, cycled: answering 100k would take minutes).
        answers = [engine.answer(q) for q in questions[:500]]
        folder = Path(tmp) / "size"
        log = TurnLog(folder, model="models:/bucketchat@champion", table="conversations", table_version=3, source="serve")
        for i in range(100_000):
            log.record(questions[i % len(questions)], answers[i % len(answers)], conversation=f"conv-{i // 4}")
        log.flush()
        jsonl = sum(f.stat().st_size for f in folder.glob("*.jsonl"))
        log.close()
        parquet = sum(f.stat().st_size for f in folder.glob("*.parquet"))
        assert read_turns(folder).num_rows == 100_000
    result = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    result |= {"parquet_mb_per_100k_turns": round(parquet / 1e6, 2), "jsonl_mb_per_100k_turns": round(jsonl / 1e6, 2), "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
