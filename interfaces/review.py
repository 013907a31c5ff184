"""``bucketchat review``: the turns the bot could not answer well, grouped by topic, each group decided
by a person in a few keystrokes (retrieval/review.py), the decisions written as a drop for
``bucketchat retrain`` and the nightly ``retrain`` deployment."""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path

from tasks.settings import CHAMPION_ALIAS

CHOICES = "1-9 use that response · n write a new one · o out of scope · f WORDS find a stored response · m all messages · s skip · q finish"


def open_review(a):
    """The engine (for suggestions and the model's encoder), the log folder, and the groups to decide."""
    from retrieval.answer import ChatEngine, ChatOptions
    from retrieval.review import pending_groups
    from retrieval.turn_log import turns_folder
    from tasks import registry

    if bool(a.weights) != bool(a.meta):
        raise ValueError("--weights and --meta go together; pass both, or neither to use --model")
    if not 0.0 < a.similarity <= 1.0:
        raise ValueError(f"--similarity must be a cosine similarity in (0, 1], got {a.similarity}")
    if not 0.0 <= a.below <= 1.0:
        raise ValueError(f"--below must be a probability in [0, 1], got {a.below}")
    if a.max_groups is not None and a.max_groups < 1:
        raise ValueError(f"--max_groups must be 1 or more, got {a.max_groups}")
    if a.days is not None and a.days < 1:
        raise ValueError(f"--days must be 1 or more, got {a.days}")
    model = a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}"
    weights, meta = (a.weights, a.meta) if a.weights else registry.download_model(model)
    engine = ChatEngine(str(weights), str(meta), ChatOptions(device=a.device))
    db = a.db or (engine.meta.get("table") or {}).get("db")
    if not db:
        raise ValueError("the model names no table, so there is no conversation log to review; pass --db DB")
    folder = turns_folder(db)
    since = None
    if a.days:
        from datetime import UTC, datetime, timedelta

        since = datetime.now(UTC) - timedelta(days=a.days)
    return engine, folder, pending_groups(engine, folder, a.below, a.similarity, since)


def cmd_review(a) -> None:
    from retrieval.review import Decision, suggestions, write_decisions

    engine, folder, groups = open_review(a)
    if not groups:
        print(f"nothing to review: no fallbacks, thumbs-down or answers under {a.below:.0%} confidence that are not decided yet ({folder})")
        return
    todo = [t for g in groups for t in g.turns]
    if a.list:
        shown = [g.to_dict(suggestions(engine, g)) for g in groups[: a.max_groups]]
        if a.json:
            print(json.dumps(shown, indent=2, ensure_ascii=False))
        else:
            for i, (g, d) in enumerate(zip(groups, shown), start=1):
                print_group(g, d["suggestions"], i, len(groups))
        return
    reviewer = a.reviewer or os.environ.get("BUCKETCHAT_REVIEWER") or getpass.getuser()
    drop_dir = Path(a.drop_dir)
    warn_lonely_drop(drop_dir)
    print(
        f"{len(todo)} turns need a look, in {len(groups)} group(s), biggest first. Decisions go to {drop_dir}/ when you finish "
        f"(q, or the end of input), for the next `bucketchat retrain --data_dir {drop_dir}`.\n{CHOICES}"
    )
    decisions: list[Decision] = []
    try:
        for i, g in enumerate(groups[: a.max_groups], start=1):
            # A topic split over several groups: the response written for the first is offered first.
            written = [{"response": d.response, "probability": None} for d in decisions if d.kind == "new"]
            offered = {s["response"] for s in written}
            offers = written + [s for s in suggestions(engine, g) if s["response"] not in offered]
            while True:
                choice = decide(engine, g, offers, i, len(groups))
                if choice in ("quit", None):
                    break
                try:
                    decisions.append(Decision(g, *choice))
                    break
                except ValueError as exc:  # a response the data rules refuse: say why, ask again
                    print(f"  {exc}")
            if choice == "quit":
                break
    finally:  # Ctrl-C keeps what was decided
        drop = write_decisions(decisions, drop_dir, folder, reviewer)
        if drop:
            turns = sum(len(d.group.turns) for d in decisions)
            print(
                f"\n{len(decisions)} decision(s) on {turns} turns written to {drop}; `bucketchat retrain --data_dir {drop_dir}` learns them"
            )
        else:
            print("\nno decisions; nothing written")


def print_group(g, suggested: list[dict], i: int, n: int, every: bool = False) -> None:
    d = g.to_dict()
    why = ", ".join(f"{k} {v}" for k, v in d["reasons"].items())
    print(f"\n[{i}/{n}] {d['turns']} turn(s), {d['first'][:10]} … {d['last'][:10]} · {why}")
    messages = g.messages if every else g.messages[:8]
    for m, count in messages:
        print(f"  ×{count:<3} {m[:160]}")
    if len(g.messages) > len(messages):
        print(f"  … and {len(g.messages) - len(messages)} more distinct message(s) (m shows them)")
    if suggested:
        print("  suggested (the model's candidates for these messages):")
        for j, s in enumerate(suggested, start=1):
            how = "written in this review" if s["probability"] is None else f"{s['probability']:.0%}"
            print(f"    {j}) {s['response'][:160]}  ({how})")


def decide(engine, g, suggested: list[dict], i: int, n: int):
    """One group's decision read from the person: (kind, response) or None (skip) or "quit"."""
    from retrieval.review import find_responses

    print_group(g, suggested, i, n)
    listed = [s["response"] for s in suggested]
    while True:
        line = ask("> ")
        if line is None or line == "q":
            return "quit"
        if line == "s":
            return None
        if line == "o":
            return ("out_of_scope", None)
        if line == "m":
            print_group(g, suggested, i, n, every=True)
        elif line == "n":
            text = ask("response> ")
            if text is None:
                return "quit"
            if text.strip():
                return ("new", text)
            print("  (empty: nothing decided)")
        elif line.startswith("f "):
            listed = find_responses(engine, line[2:])
            for j, r in enumerate(listed, start=1):
                print(f"    {j}) {r[:160]}")
            if not listed:
                print("  no stored response has all of those words")
        elif line.isdigit() and 1 <= int(line) <= len(listed):
            return ("existing", listed[int(line) - 1])
        else:
            print(f"  {CHOICES}")


def ask(prompt: str) -> str | None:
    """A line from the person (None at the end of input); a pipe works too, for scripted reviews."""
    if sys.stdin.isatty():
        try:
            return input(prompt).strip()
        except EOFError:
            return None
    print(prompt, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
        return None
    print(line.rstrip("\n"))
    return line.strip()


def warn_lonely_drop(drop_dir: Path) -> None:
    """A retrain trains on the drop folder's files alone: a folder of review drops only would make a
    bot of the reviewed turns."""
    from conversations.records import INPUT_SUFFIXES

    others = [
        p for p in drop_dir.glob("*") if p.suffix in INPUT_SUFFIXES and not p.name.startswith("review-") and ".rejects." not in p.name
    ]
    if not others:
        print(
            f"note: {drop_dir} holds no conversation data besides reviews; `bucketchat retrain` trains on that folder's files only, "
            "so put the bot's data there too (or pass --drop_dir the folder the retrain deployment reads)",
            file=sys.stderr,
        )
