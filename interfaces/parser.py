"""``bucketchat``'s argument parser: one subcommand per seed script, with the seed's flags."""

from __future__ import annotations

import argparse

from interfaces.flags import add_verbose, arg, column_args, dask_args, encoder_arg, expansion_args, model_name_arg, near_dup_arg, train_args
from tasks.settings import CHAMPION_ALIAS, TABLE_NAME

EXAMPLES = """examples:
  bucketchat pipeline --data conversation_data.sample.jsonl
  bucketchat chat                                   # the registered champion, interactive
  bucketchat chat --json < questions.txt            # one JSON answer per input line
  bucketchat expand --input conversation_data.sample.jsonl --output conversation_data.large.jsonl --target 5000
  bucketchat db build --data conversation_data.large.jsonl --db llm_chat.db && bucketchat db stats --db llm_chat.db
  bucketchat finetune --data conversation_data.sample.jsonl --device cpu
"""


def engine_args(p: argparse.ArgumentParser) -> None:
    """The chat engine's flags (chat, eval, serve): the seed's chat_app.py flags plus thresholds."""
    from models.config import SIZES
    from retrieval.styles import STYLES

    arg(p, "--model", help=f"MLflow model URI (default models:/MODEL_NAME@{CHAMPION_ALIAS}: the champion of --model_name)")
    model_name_arg(p, promote=False)
    arg(p, "--weights", help="local weights file (with --meta) instead of --model")
    arg(p, "--meta", help="local meta JSON (with --weights)")
    arg(p, "--device", default="cpu", help="cpu or cuda (default cpu)")
    arg(
        p,
        "--model_size",
        choices=["auto", *SIZES],
        default="auto",
        help="auto reads the size from the checkpoint (default); a size refuses a checkpoint of another size",
    )
    arg(
        p,
        "--pool_mode",
        choices=["all", "top"],
        default="all",
        help="all: every bucket, weighted by its probability (default); top: only the --top_labels likeliest",
    )
    arg(p, "--top_labels", type=int, default=3, help="buckets searched with --pool_mode top (default 3)")
    arg(
        p,
        "--response_temperature",
        type=float,
        default=0.0,
        help="0 = always the best response (default); higher samples among the best, seeded by --seed",
    )
    arg(p, "--llm_db", help="LanceDB folder to retrieve from (default: the table version the model pins)")
    arg(p, "--db_top_k", type=int, default=20, help="rows retrieved per message (default 20)")
    arg(
        p,
        "--style_mode",
        choices=list(STYLES),
        default="balanced",
        help="balanced: the stored response verbatim (default); concise: its first sentence; analyst: laid out as short answer + points; creative: with an opener/closer; auto: picked from cues in the message",
    )
    arg(
        p,
        "--creativity",
        type=float,
        default=0.35,
        help="with the creative style, the chance (0-1) of an opener and of a closer (default 0.35)",
    )
    arg(p, "--min_confidence", type=float, help="fall back below this confidence (default: calibrated at training)")
    arg(
        p,
        "--min_margin",
        type=float,
        help="fall back when the answer leads the runner-up by less than this probability (default: calibrated at training)",
    )
    arg(
        p,
        "--min_similarity",
        type=float,
        help="fall back when the message's cosine similarity to the nearest stored message is below this: it is unlike anything the bot was trained on (default: calibrated at training; 0 turns it off; `eval --oos` shows the trade-off)",
    )
    arg(p, "--seed", type=int, default=0, help="seed for sampling and the creative style (default 0)")


def log_source_args(p: argparse.ArgumentParser, verb: str) -> None:
    """Whose conversation log a command reads (report, review): a model's table, or a table folder."""
    arg(p, "--model", help=f"MLflow model URI whose table's log to {verb} (default models:/MODEL_NAME@{CHAMPION_ALIAS})")
    model_name_arg(p, promote=False)
    arg(p, "--weights", help="local weights file (with --meta) instead of --model")
    arg(p, "--meta", help="local meta JSON (with --weights)")
    arg(p, "--db", help=f"{verb} the log of this table folder instead of the model's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bucketchat",
        description="Train a retrieval-style chatbot on your conversation logs and chat with it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "expand",
        help="grow a dataset with synthetic variants",
        description="Grow a conversation JSONL to exactly --target records with meaning-preserving variants of the user side. Each new record carries parent_id and op.",
    )
    arg(p, "--input", required=True, help="conversations: .jsonl (flat pairs or multi-turn), .json array, .csv/.tsv or .parquet table")
    expansion_args(p, target_required=True)
    column_args(p)

    p = sub.add_parser(
        "build-super",
        help="merge sources, filter, dedupe and expand",
        description="Merge several sources (each keeps its `source`), drop unusable pairs (too short/long, mostly non-text, echoes, control characters, broken encoding), exact and near duplicates, then expand to --target if it is larger. Writes the dataset (.jsonl + .parquet), a .rejects.jsonl with every dropped record and why, and a .report.json with counts per reason.",
    )
    arg(p, "--inputs", nargs="+", required=True, help="conversation files: .jsonl, .json, .csv/.tsv or .parquet")
    expansion_args(p, target_required=False)
    column_args(p)
    near_dup_arg(p)

    p = sub.add_parser("db", help="build or inspect the LanceDB conversation table")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    b = dbsub.add_parser(
        "build",
        help="embed, bucket and write a new table version",
        description="Embed every user message (cached by content hash), assign buckets, and write a new version of the table with a full-text index (and a vector index when large).",
    )
    arg(b, "--data", required=True, help="conversations: .jsonl, .json, .csv/.tsv or .parquet")
    arg(b, "--db", required=True, help="LanceDB folder, e.g. llm_chat.db, or an object-store URI (s3://bucket/llm_chat.db)")
    arg(b, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    arg(b, "--num_buckets", type=int, default=10, help="response buckets (default 10)")
    arg(b, "--seed", type=int, default=0, help="clustering seed (default 0)")
    arg(b, "--device", default="cpu", help="encoder device (default cpu)")
    arg(b, "--strict", action="store_true", help="stop at the first malformed line")
    encoder_arg(b)
    dask_args(b)
    column_args(b)
    s = dbsub.add_parser(
        "stats", help="rows, buckets, sources, versions and index state", description="Describe the latest version of the table."
    )
    arg(s, "--db", required=True, help="LanceDB folder or object-store URI")
    arg(s, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    arg(s, "--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "finetune",
        help="train, log to MLflow, register, promote if better",
        description="Train the 10-bucket head on a pinned table version, log it to MLflow, register a version of `bucketchat` and move the `champion` alias only if it scores strictly better on the same validation set.",
    )
    arg(p, "--data", help="conversation data; (re)builds --db from it first. Without it, trains on the table as it is")
    arg(p, "--db", default="llm_chat.db", help="LanceDB folder or object-store URI (default llm_chat.db)")
    arg(p, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    arg(p, "--table_version", type=int, help="table version to train on (default: the latest)")
    arg(p, "--num_buckets", type=int, default=10, help="response buckets when building (default 10)")
    arg(p, "--seed", type=int, default=42, help="seed for the split, init and sampling (default 42)")
    arg(p, "--output", default="champion_model_chat_ft.pth", help="local weights file (safetensors; default champion_model_chat_ft.pth)")
    arg(p, "--meta", default="chat_model_meta.json", help="local meta JSON (default chat_model_meta.json)")
    arg(p, "--strict", action="store_true", help="stop at the first malformed line")
    encoder_arg(p)
    column_args(p)
    train_args(p)

    p = sub.add_parser(
        "size-sweep",
        help="train every head size on one table, for side-by-side comparison in MLflow",
        description="Train base, large, xlarge and xxlarge heads on the same table version (one MLflow run and registered version each, tagged model_size). The champion moves to whichever beats it on validation.",
    )
    arg(p, "--data", help="conversation data; (re)builds --db from it first")
    arg(p, "--db", default="llm_chat.db", help="LanceDB folder or object-store URI (default llm_chat.db)")
    arg(p, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    arg(p, "--table_version", type=int, help="table version to train on (default: the latest)")
    arg(p, "--sizes", nargs="+", default=None, help="sizes to train (default: all four)")
    arg(p, "--num_buckets", type=int, default=10, help="response buckets when building (default 10)")
    arg(p, "--seed", type=int, default=42, help="seed (default 42)")
    train_args(p, sweep=True)

    p = sub.add_parser("registry", help="list registered model versions, or roll the champion back")
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser("list", help="versions with their validation scores, sizes and aliases")
    model_name_arg(r, promote=False)
    arg(r, "--json", action="store_true", help="print JSON")
    r = rsub.add_parser("rollback", help="point the champion alias at an earlier version")
    model_name_arg(r, promote=False)
    arg(r, "--version", type=int, help="version to make champion (default: the newest one older than the current champion)")

    p = sub.add_parser(
        "chat",
        help="answer messages with the champion (or given weights)",
        description="Interactive on a terminal: the conversation keeps its history, so short follow-ups are read with the turn before; /why explains the last answer, /reset starts over, /help lists commands, `exit` quits. With piped input, answers each line as its own conversation.",
    )
    engine_args(p)
    arg(
        p,
        "--no_log",
        action="store_true",
        help="do not record the turns in the conversation log (default: every turn is kept beside the table, in _turns/, for review and monitoring)",
    )
    arg(p, "--json", action="store_true", help="print one JSON object per answer")
    arg(p, "--echo", action="store_true", help="with piped input, print each message before its answer")
    arg(
        p,
        "--strict",
        action="store_true",
        help="with piped input, exit with status 1 when any line could not be answered (every other line is still answered)",
    )

    p = sub.add_parser(
        "eval",
        help="score a model on labelled test data (and out-of-scope messages)",
        description="Ask every line of --data through the chat engine and report response accuracy (a fallback counts as wrong), bucket accuracy, fallback rate, latency percentiles and, with --oos, the share of out-of-scope messages that fall back.",
    )
    arg(p, "--data", required=True, help="test conversations (.jsonl, .json, .csv, .parquet): each assistant text is the expected response")
    arg(p, "--oos", help="JSONL (or plain text, one message per line) of messages the bot should not answer")
    engine_args(p)
    arg(p, "--json", action="store_true", help="print the report as JSON")
    column_args(p)

    p = sub.add_parser(
        "report",
        help="what the bot answered, per day: turns, fallbacks, thumbs down, confidence, which model",
        description="Read the conversation log that chat and serve keep beside the table (the champion's by default) and print, per day: turns, conversations, fallback rate, ratings and the share rated wrong, confidence (10th and 50th percentiles), median latency and the model and table version that answered. --mlflow also logs it to the model's training run.",
    )
    log_source_args(p, "read")
    arg(p, "--days", type=int, help="only the last N days (default: all)")
    arg(p, "--json", action="store_true", help="print the days as JSON")
    arg(p, "--mlflow", action="store_true", help="also log the days to the model's MLflow training run (metrics and a plot)")

    p = sub.add_parser(
        "review",
        help="decide what the bot should have answered: fallbacks, thumbs-down, unsure answers, grouped by topic",
        description="Read the conversation log (the champion's table by default), keep the turns that fell back, were rated bad, or were answered with less than --below confidence, and group them by what was asked, biggest group first. For each group pick a suggested stored response, write a new one, or mark it out of scope; the decisions are written as one JSONL drop (with the turns, reviewer and time) into --drop_dir, which `bucketchat retrain` and the nightly retrain deployment learn from. Out-of-scope decisions teach the bot to fall back on that topic. Input may be piped, one answer per line.",
    )
    log_source_args(p, "review")
    arg(p, "--device", default="cpu", help="cpu or cuda (default cpu)")
    arg(p, "--drop_dir", default="data/drops", help="the retrain folder the decisions go to (default data/drops: the retrain deployment's)")
    arg(p, "--days", type=int, help="only turns of the last N days (default: all not yet decided)")
    arg(
        p,
        "--below",
        type=float,
        default=0.5,
        help="also review answers less confident than this (default 0.5; 0: only fallbacks and thumbs-down)",
    )
    arg(
        p,
        "--similarity",
        type=float,
        default=0.5,
        help="how alike a group's messages are (mean cosine similarity; default 0.5). Higher: smaller, purer groups, more decisions",
    )
    arg(p, "--reviewer", help="who decides, kept with each decision (default $BUCKETCHAT_REVIEWER, else your user name)")
    arg(p, "--max_groups", type=int, help="stop after this many groups (default: all)")
    arg(p, "--list", action="store_true", help="print the groups and their suggestions, decide nothing")
    arg(p, "--json", action="store_true", help="with --list, print JSON")

    p = sub.add_parser(
        "serve",
        help="HTTP server: OpenAI-compatible chat completions and a chat page",
        description="Serve the chat engine over HTTP: POST /v1/chat/completions (OpenAI-compatible, stream too), GET /v1/models, GET /healthz, POST /v1/feedback, a chat page at / and a review page at /review (GET/POST /v1/review: decide what the bot should have answered; decisions go to --drop_dir). The model and table load once.",
    )
    engine_args(p)
    arg(
        p,
        "--no_log",
        action="store_true",
        help="do not record the turns in the conversation log (default: every turn is kept beside the table, in _turns/, for review and monitoring)",
    )
    arg(p, "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    arg(p, "--port", type=int, default=8000, help="port (default 8000)")
    arg(p, "--api_key", help="require `Authorization: Bearer KEY` on /v1 (default: $BUCKETCHAT_API_KEY, else no key)")
    arg(p, "--max_concurrency", type=int, default=64, help="answers in flight at once; more get 429 (default 64)")
    arg(
        p,
        "--workers",
        default="auto",
        help="processes answering on the one port (default auto: one per core, at most 4; each holds ~300 MB, the table index is shared). One process answers on about one core",
    )
    arg(p, "--workers_threads", type=int, default=2, help="threads answering requests in each process (default 2)")
    arg(
        p,
        "--drop_dir",
        default="data/drops",
        help="where the review page (/review) writes its decisions: the retrain folder (default data/drops, the retrain deployment's)",
    )

    p = sub.add_parser(
        "pipeline",
        help="the whole chain on embedded defaults",
        description="Prepare (merge, filter, dedupe) -> [expand] -> build the table -> train -> register -> promote. Everything goes under --workdir; runs are tracked in MLFLOW_TRACKING_URI (default: mlflow/ in the project).",
    )
    arg(p, "--data", nargs="+", required=True, help="conversation files: .jsonl, .json, .csv/.tsv or .parquet (tables: see --user_col)")
    arg(p, "--workdir", help="folder for everything the run makes (default .bucketchat/work in the project)")
    arg(
        p,
        "--db",
        help="LanceDB location for the table: a folder or an object-store URI such as s3://bucket/bucketchat.db (default WORKDIR/llm_chat.db)",
    )
    arg(
        p,
        "--target",
        type=int,
        help="expand the dataset to this many records first (default: no expansion; on held-out BANKING77 rows it no longer helped the head, see BENCHMARKS.md)",
    )
    arg(p, "--creative_prob", type=float, default=0.0, help="see `bucketchat expand`")
    arg(p, "--blend_prob", type=float, default=0.0, help="see `bucketchat expand`")
    arg(p, "--num_buckets", type=int, default=10, help="response buckets (default 10)")
    arg(p, "--seed", type=int, default=42, help="seed (default 42)")
    arg(p, "--strict", action="store_true", help="stop at the first malformed line")
    near_dup_arg(p, action="keep a pair in its twin's family (never split across train/validation)")
    encoder_arg(p)
    dask_args(p)
    column_args(p)
    train_args(p)

    p = sub.add_parser(
        "retrain",
        help="retrain from a folder of data drops; the champion moves only if better",
        description="Run the pipeline over every conversation file (*.jsonl, *.json, *.csv, *.tsv, *.parquet) in --data_dir (what the scheduled `retrain` deployment does). Unchanged data is neither re-read, re-deduplicated nor re-embedded; an unchanged folder writes no table version and trains nothing. A new model is registered and becomes champion only if it beats the champion on validation; the output says why.",
    )
    arg(p, "--data_dir", required=True, help="folder of conversation file drops (*.rejects.jsonl files are skipped)")
    arg(p, "--workdir", help="as in `bucketchat pipeline` (default .bucketchat/work in the project)")
    arg(p, "--target", type=int, help="as in `bucketchat pipeline` (default: no expansion)")
    arg(p, "--force", action="store_true", help="train even when nothing changed")
    model_name_arg(p, promote=False)
    encoder_arg(p)
    column_args(p)
    add_verbose(parser)
    return parser
