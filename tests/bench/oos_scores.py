"""How far can an out-of-scope score go on these vectors? The best out-of-scope recall each score
family reaches while in-scope accuracy stays within a budget of the no-fallback accuracy, with the
threshold chosen *on the test set itself* (an oracle: no real gate does better than this).

    python tests/bench/oos_scores.py [--holdout 10] [--seed 0] [--budget 0.005] [--json OUT]

Held-out intents are drawn by seed as in tests/bench/oos.py; the classifier is logistic regression
(C=10) on the shipped int8 MiniLM vectors of the other intents' training rows, i.e. the ceiling
bucketchat's head matches. Two kinds of out-of-scope messages:
- near: the held-out banking intents' test messages (a banking bot's unseen topics);
- far: OpenAssistant prompts (../shared/data/oasst, Apache-2.0): general questions no banking bot
  should answer, from a source nothing here trains on.

Scores (higher = more in scope): max softmax probability, margin (top-1 minus top-2 probability),
energy (logsumexp of the logits), cosine similarity to the nearest training message, and the same
to the nearest training message of the predicted intent; negative Mahalanobis distance to the
predicted intent's mean under a shared covariance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def best_recall(score_in: np.ndarray, right_in: np.ndarray, score_oos: np.ndarray, budget: float) -> tuple[float, float]:
    """The highest out-of-scope recall over thresholds t (fallback when score < t) such that in-scope
    accuracy drops by at most ``budget``; returns (recall, in-scope accuracy at that t)."""
    base = right_in.mean()
    best = (0.0, base)
    for t in np.unique(np.concatenate([score_in, score_oos])):
        acc = (right_in & (score_in >= t)).mean()
        if base - acc > budget + 1e-12:
            break
        best = max(best, ((score_oos < t).mean(), acc))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holdout", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.005, help="in-scope accuracy the gate may cost (default 0.005)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    from scipy.special import logsumexp, softmax
    from sklearn.linear_model import LogisticRegression

    from retrieval.encoder import embed

    train, test = rows(DATA / "banking77" / "train.jsonl"), rows(DATA / "banking77" / "test.jsonl")
    intents = sorted({r["intent"] for r in train})
    held = set(random.Random(a.seed).sample(intents, a.holdout))
    tr = [r for r in train if r["intent"] not in held]
    ins = [r for r in test if r["intent"] not in held]
    near = [r for r in test if r["intent"] in held]
    far = sorted(
        {r["user"] for f in ("oasst_en100_pairs.jsonl", "oasst_en100_multiturn.jsonl") for r in rows(DATA / "oasst" / f) if r.get("user")}
    )

    def vec(texts):
        v = embed(texts)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x_tr, x_in, x_near, x_far = vec([r["user"] for r in tr]), vec([r["user"] for r in ins]), vec([r["user"] for r in near]), vec(far)
    labels = sorted({r["intent"] for r in tr})
    y_tr = np.array([labels.index(r["intent"]) for r in tr])
    y_in = np.array([labels.index(r["intent"]) for r in ins])
    clf = LogisticRegression(C=10, max_iter=2000).fit(x_tr, y_tr)
    means = np.stack([x_tr[y_tr == k].mean(0) for k in range(len(labels))])
    centred = x_tr - means[y_tr]
    prec = np.linalg.pinv(np.cov(centred, rowvar=False) + 1e-3 * np.eye(x_tr.shape[1]))

    def scores(x: np.ndarray) -> dict[str, np.ndarray]:
        logits = clf.decision_function(x)
        pr = softmax(logits, axis=1)
        top2 = np.sort(pr, axis=1)[:, -2:]
        pred = pr.argmax(1)
        sims = x @ x_tr.T
        own = np.where(y_tr[None, :] == pred[:, None], sims, -1.0).max(1)
        d = x - means[pred]
        return {
            "max softmax": top2[:, 1],
            "margin": top2[:, 1] - top2[:, 0],
            "energy": logsumexp(logits, axis=1),
            "nearest training message": sims.max(1),
            "nearest of the predicted intent": own,
            "Mahalanobis (predicted intent)": -np.einsum("ij,jk,ik->i", d, prec, d),
            "_pred": pred,
        }

    s_in, s_near, s_far = scores(x_in), scores(x_near), scores(x_far)
    right = s_in.pop("_pred") == y_in
    s_near.pop("_pred"), s_far.pop("_pred")
    print(
        f"{len(labels)} intents trained, {a.holdout} held out ({', '.join(sorted(held))}); "
        f"{len(ins)} in-scope, {len(near)} near and {len(far)} far out-of-scope test messages; "
        f"in-scope accuracy with no fallback {right.mean():.2%}; budget {a.budget:.1%}"
    )
    result = {"no_fallback_accuracy": float(right.mean()), "budget": a.budget, "held_out": sorted(held), "scores": {}}
    print(f"  {'score':<34} {'near recall':>11} {'far recall':>10}  (best within the budget, oracle threshold)")
    for name in s_in:
        near_r, near_acc = best_recall(s_in[name], right, s_near[name], a.budget)
        far_r, far_acc = best_recall(s_in[name], right, s_far[name], a.budget)
        result["scores"][name] = {"near_recall": near_r, "far_recall": far_r, "near_in_scope": near_acc, "far_in_scope": far_acc}
        print(f"  {name:<34} {near_r:>11.2%} {far_r:>10.2%}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
