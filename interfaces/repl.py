"""The chat REPL a person types into (line editing and history, ``/why``, ``/reset``) and the
line-by-line answering of piped input."""

from __future__ import annotations

import json
import sys

REPL_HELP = """commands:
  /why     the buckets, candidates, scores and source records behind the last answer
  /reset   forget the conversation so far (follow-ups are read with earlier turns)
  /good    the last answer was right (kept with it in the conversation log)
  /bad     the last answer was wrong or not what you asked: it is listed for review
  /help    this list
  exit     quit"""


def print_why(why: dict) -> None:
    print("  buckets: " + ", ".join(f"{b['bucket']} ({b['probability']:.1%})" for b in why["buckets"]))
    t = why["thresholds"]
    gates = [
        f"confidence {why['confidence']:.4f}"
        + (f" (falls back below {t['min_confidence']:.4f})" if t["min_confidence"] > 0 else " (no confidence gate)"),
        f"lead over the runner-up {why['margin']:.4f}"
        + (f" (falls back below {t['min_margin']:.4f})" if t["min_margin"] > 0 else " (no margin gate)"),
    ]
    if why.get("similarity") is not None:
        gates.append(
            f"similarity to the nearest stored message {why['similarity']:.4f}"
            + (f" (falls back below {t['min_similarity']:.4f})" if t.get("min_similarity", 0) > 0 else " (no similarity gate)")
        )
    print("  " + ", ".join(gates) + (" -> FALLBACK" if why["fallback"] else ""))
    if why["context"]:
        print(f"  read as a follow-up of: {why['context']!r}")
    for i, c in enumerate(why["candidates"], start=1):
        print(f"  {i}. [{c['from']}, bucket {c['bucket']}, log score {c['score']:.3f}] {c['response'][:100]}")
        for r in c["records"]:
            print(f'       from {r["id"]}  "{(r["user"] or "")[:80]}"')


HISTORY_LINES = 1000


def _line_editing() -> None:
    """Arrow keys, Ctrl-R and history across sessions, from the standard library's readline (kept
    in the state folder, so each project has its own). Without readline, plain input()."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    from tasks.settings import state_home

    history = state_home() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        return
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            readline.write_history_file(history)
        except OSError:
            pass  # a read-only state folder costs the history, not the chat

    atexit.register(save)


def run_repl(engine, title: str, as_json: bool) -> None:
    """Talk to ``engine`` until ``exit``, Ctrl-D or Ctrl-C; follow-ups are read with earlier turns."""
    from conversations.text import TextError, json_line
    from retrieval.answer import Conversation

    _line_editing()
    print(f"bucketchat — {title}. /help for commands, 'exit' to quit.")
    convo = Conversation(engine)
    while True:
        try:
            message = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except UnicodeDecodeError:
            print("(that line was not valid text in this terminal's encoding; type it again)")
            continue
        if message.lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command == "/help":
                print(REPL_HELP)
            elif command == "/reset":
                convo.reset()
                print("(conversation reset)")
            elif command == "/why":
                if convo.last is None:
                    print("(nothing answered yet)")
                elif as_json:
                    print(json.dumps(engine.explain(convo.last), ensure_ascii=False, indent=2))
                else:
                    print_why(engine.explain(convo.last))
            elif command in ("/good", "/bad"):
                if convo.last is None or convo.last.turn is None or engine.turn_log is None:
                    print("(nothing to rate: no answer yet, or the conversation log is off with --no_log)")
                else:
                    engine.turn_log.feedback(convo.last.turn, command[1:], conversation=convo.id)
                    print(f"(noted: {command[1:]})")
            else:
                print(f"unknown command {command}; /help lists them")
            continue
        try:
            ans = convo.say(message)
        except TextError as exc:
            print(f"({exc})")
            continue
        print(json_line({"message": message, **ans.to_dict()}), end="") if as_json else print(f"bot> {ans.response}")


def answer_lines(engine, stream, out, as_json: bool, echo: bool) -> int:
    """Answer each line of a binary ``stream`` as its own conversation, writing UTF-8 to the binary
    ``out`` whatever the locale; returns how many lines failed.

    A line that cannot be answered (not UTF-8, a lone surrogate, over the length limit, nothing but
    control characters) is reported on its own (``--json``: an ``error`` field; otherwise on stderr)
    and the next line is answered: one bad line never ends a batch.
    """
    from conversations.text import MAX_MESSAGE_CHARS, TextError, decode_line, json_line, read_lines

    failed = 0
    limit = 4 * MAX_MESSAGE_CHARS  # bytes: a character is at most 4
    for number, (raw, size) in enumerate(read_lines(stream, limit), start=1):
        shown = raw.decode("utf-8", "replace").rstrip("\r\n")
        try:
            if size > limit:
                raise TextError("too_long", f"the message is {size:,} bytes, over the {limit:,}-byte limit", "send a shorter message")
            message = decode_line(raw)
            if not message.strip():
                continue  # blank lines separate nothing; each line is its own conversation anyway
            ans = engine.answer(message)
        except TextError as exc:
            failed += 1
            if as_json:
                out.write(json_line({"line": number, "message": shown[:200], "error": str(exc)}).encode())
            else:
                print(f"bucketchat chat: line {number}: {exc}", file=sys.stderr, flush=True)
            out.flush()
            continue
        if as_json:
            out.write(json_line({"line": number, "message": message, **ans.to_dict()}).encode())
        else:
            out.write((f"you> {message}\nbot> {ans.response}\n\n" if echo else ans.response + "\n").encode())
        out.flush()
    return failed
