"""The simple approaches a user would otherwise pick, on the same train and test files as
tests/bench/accuracy.py: the baselines bucketchat's response accuracy is compared with.

    python tests/bench/peers.py [--train TRAIN.jsonl] [--test TEST.jsonl] [--repeats 3] [--json OUT]

- TF-IDF (word 1-2 grams and char 2-5 grams within words, sublinear tf) + linear SVM (scikit-learn
  LinearSVC, C=1): the strongest of the plain variants (word-only scores ~1.8 points lower here), so
  the comparison errs against bucketchat;
- nearest neighbour: the response of the most cosine-similar training message, MiniLM vectors;
- logistic regression on frozen MiniLM vectors (C=10).

The vectors come from the same shipped encoder bucketchat uses (int8 MiniLM). Each predicts the
response text; correct = equals the test line's ``assistant``, as in accuracy.py. Fits are
deterministic, so repeats vary only in time; each repeat reports accuracy, fit and predict seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "banking77"


def rows(path: Path) -> list[dict]:
    return [
        r for r in (json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()) if "user" in r and "assistant" in r
    ]


def run(train: list[dict], test: list[dict]) -> dict:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_union
    from sklearn.svm import LinearSVC

    from retrieval.encoder import embed

    x_txt, y = [r["user"] for r in train], np.asarray([r["assistant"] for r in train])
    t_txt, t_y = [r["user"] for r in test], np.asarray([r["assistant"] for r in test])
    out = {}

    t0 = time.perf_counter()
    vec = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    )
    svm = LinearSVC(C=1.0).fit(vec.fit_transform(x_txt), y)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = svm.predict(vec.transform(t_txt))
    out["tfidf_svm"] = {"accuracy": float((pred == t_y).mean()), "fit_s": fit, "predict_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    xe = embed(x_txt)
    embed_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    te = embed(t_txt)
    embed_test = time.perf_counter() - t0

    t0 = time.perf_counter()
    nn = y[np.argmax(te @ xe.T, axis=1)]
    out["minilm_nearest_neighbour"] = {
        "accuracy": float((nn == t_y).mean()),
        "fit_s": embed_train,
        "predict_s": embed_test + time.perf_counter() - t0,
    }

    t0 = time.perf_counter()
    lr = LogisticRegression(C=10, max_iter=2000).fit(xe, y)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = lr.predict(te)
    out["minilm_logistic_regression"] = {
        "accuracy": float((pred == t_y).mean()),
        "fit_s": embed_train + fit,
        "predict_s": embed_test + time.perf_counter() - t0,
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    p.add_argument("--test", type=Path, default=DATA / "test.jsonl")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not a.train.is_file():
        sys.exit(f"--train {a.train} not found; this benchmark needs ../shared/data/banking77 beside the checkout")
    train, test = rows(a.train), rows(a.test)
    runs = []
    for i in range(a.repeats):
        runs.append(run(train, test))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in runs[-1].items()), flush=True)
    summary = {
        k: {
            m: {"median": statistics.median(r[k][m] for r in runs), "min": min(r[k][m] for r in runs), "max": max(r[k][m] for r in runs)}
            for m in runs[0][k]
        }
        for k in runs[0]
    }
    print(f"\n{a.train.name} -> {a.test.name} ({len(train)} train, {len(test)} test), median of {a.repeats}:")
    for k, v in summary.items():
        print(
            f"  {k:<28} accuracy {v['accuracy']['median']:.4f}  fit {v['fit_s']['median']:.1f} s  predict {v['predict_s']['median']:.1f} s"
        )
    if a.json:
        a.json.write_text(json.dumps({"train": str(a.train), "test": str(a.test), "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
