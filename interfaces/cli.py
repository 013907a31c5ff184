"""The ``bucketchat`` command: the seed's scripts as subcommands, with the seed's flag names.

Flags are snake_case as in the seed; the kebab-case spelling works too (``--creative-prob``).
Heavy imports happen inside each command, so ``--help`` is instant and ``chat`` never loads Prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from tasks.settings import CHAMPION_ALIAS, MODEL_NAME, TABLE_NAME, apply_environment

EXAMPLES = """examples:
  bucketchat pipeline --data conversation_data.sample.jsonl
  bucketchat chat                                   # the registered champion, interactive
  bucketchat chat --json < questions.txt            # one JSON answer per input line
  bucketchat expand --input conversation_data.sample.jsonl --output conversation_data.large.jsonl --target 5000
  bucketchat db build --data conversation_data.large.jsonl --db llm_chat.db && bucketchat db stats --db llm_chat.db
  bucketchat finetune --data conversation_data.sample.jsonl --device cpu
"""


def _arg(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--snake_name`` and its ``--kebab-name`` twin."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def _expansion_args(p: argparse.ArgumentParser, target_required: bool) -> None:
    _arg(p, "--output", required=True, help="output dataset (.jsonl; a .parquet twin and a .rejects.jsonl are written beside it)")
    _arg(p, "--target", type=int, required=target_required, help="number of records to grow the dataset to (exactly)")
    _arg(
        p,
        "--creative_prob",
        type=float,
        default=0.0,
        help="probability a variant also gets a conversational opener on the assistant side (default 0)",
    )
    _arg(p, "--blend_prob", type=float, default=0.0, help="probability a variant joins two user messages that share a response (default 0)")
    _arg(p, "--seed", type=int, default=42, help="random seed; the same seed gives the same output (default 42)")
    _arg(p, "--strict", action="store_true", help="stop at the first malformed line instead of writing it to the rejects file")


def _model_name_arg(p: argparse.ArgumentParser, promote: bool = True) -> None:
    """The bot a command works on: its registered model, whose ``champion`` alias is what chat serves."""
    _arg(
        p,
        "--model_name",
        type=_model_name,
        default=MODEL_NAME,
        help=f"the bot: the registered model its versions and champion belong to; one name per bot, so two bots never replace each other's champion (default {MODEL_NAME})",
    )
    if promote:
        _arg(
            p,
            "--replace_champion",
            action="store_true",
            help="let the new model become champion even when it shares under half of its responses with the current champion (by default such a model is registered but not promoted: it looks like another bot)",
        )


def _model_name(value: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a usable model name; use letters, digits, '_', '.' and '-' (e.g. support-bot)")
    return value


def _near_dup_arg(p: argparse.ArgumentParser, action: str = "drop a pair") -> None:
    _arg(
        p,
        "--near_dup_threshold",
        type=float,
        default=0.9,
        help=f"{action} whose user and assistant text are both at least this similar (character edit similarity, 0-1) to an earlier pair with the same context (default 0.9)",
    )


def _train_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Every training flag of the seed, defaults from ``TrainConfig``/``HeadConfig`` (one source)."""
    from models.heads import SIZES
    from models.train import TrainConfig

    d = TrainConfig()
    _model_name_arg(p)
    g = p.add_argument_group("model")
    if not sweep:
        _arg(
            g,
            "--model_size",
            choices=SIZES,
            default="base",
            help="head size: base (MLP), large (+1 adapter branch), xlarge (+2, learned router), xxlarge (+3) (default base)",
        )
    _arg(g, "--expansion_dim", type=int, help="width of the first adapter branch (large and up; default 768, xlarge 896, xxlarge 1024)")
    _arg(g, "--extra_expansion_dim", type=int, help="width of the second branch (xlarge and up; default 1536, xxlarge 2048)")
    _arg(g, "--third_expansion_dim", type=int, help="width of the third branch (xxlarge; default 3072)")
    _arg(g, "--hidden_dim", type=int, help="hidden width of the head (default 1024, or the --weights checkpoint's)")
    _arg(g, "--dropout", type=float, help="dropout in the head (default 0.5, or the --weights checkpoint's)")
    _arg(
        g,
        "--weights",
        help="warm start: a local checkpoint or a models:/NAME/VERSION (models:/bucketchat@champion) URI; tensors are matched by name and shape (candidates by response text) and a report says which matched",
    )
    _arg(
        g,
        "--train_all",
        action="store_true",
        help="fine-tune the sentence encoder too (minutes per epoch on CPU); the table then gets a new version embedded by the fine-tuned encoder, which the model pins",
    )
    _arg(
        g, "--encoder_lr", type=float, default=d.encoder_lr, help=f"learning rate of the encoder with --train_all (default {d.encoder_lr})"
    )
    g = p.add_argument_group("optimisation")
    _arg(
        g,
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"maximum epochs (default {d.epochs}; with 500+ validation rows early stopping usually ends sooner)",
    )
    _arg(
        g,
        "--batch_size",
        type=int,
        default=d.batch_size,
        help="examples per micro-batch (default auto: 64 below 8,192 training rows, else 512)",
    )
    _arg(
        g,
        "--grad_accum_steps",
        type=int,
        default=d.grad_accum_steps,
        help="micro-batches per optimizer step: effective batch = batch_size x this (default 1)",
    )
    _arg(
        g,
        "--lr",
        type=float,
        default=d.lr,
        help="AdamW learning rate of the head (default auto: 0.001 with batches of 64 or less, 0.002 up to 256, else 0.003)",
    )
    _arg(g, "--lexical_lr", type=float, default=d.lexical_lr, help=f"learning rate of the hashed n-gram weights (default {d.lexical_lr})")
    _arg(
        g,
        "--lexical_features",
        type=int,
        help="hashed n-gram buckets of the lexical path; 0 turns it off (default: up to 32768, fewer for heads with many candidates)",
    )
    _arg(g, "--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    _arg(
        g,
        "--lr_schedule",
        choices=["cosine", "linear", "constant"],
        default=d.lr_schedule,
        help=f"learning-rate schedule after warm-up (default {d.lr_schedule})",
    )
    _arg(g, "--warmup_steps", type=int, default=d.warmup_steps, help="optimizer steps of linear learning-rate warm-up (default 0)")
    _arg(
        g,
        "--label_smoothing",
        type=float,
        default=d.label_smoothing,
        help=f"bucket cross-entropy label smoothing (default {d.label_smoothing})",
    )
    _arg(
        g,
        "--ema_decay",
        type=float,
        default=d.ema_decay,
        help="keep an EMA shadow of the weights with this decay (e.g. 0.999); the best checkpoint is then picked and kept on the EMA weights (default 0 = off)",
    )
    _arg(
        g,
        "--no_ema_select",
        dest="ema_select",
        action="store_false",
        help="with --ema_decay, pick the best checkpoint on the live weights instead of the EMA ones",
    )
    _arg(
        g,
        "--select_metric",
        choices=["response_acc", "loss", "last"],
        default=d.select_metric,
        help="which epoch's weights are kept: best validation response accuracy, lowest validation loss, or the last (default auto: response_acc with 500+ validation rows, else last: fewer rows cannot tell epochs apart)",
    )
    _arg(
        g,
        "--early_stop_patience",
        type=int,
        default=d.early_stop_patience,
        help="epochs without a better validation score before stopping; the best checkpoint is kept; 0 = off (default auto: 6 with 500+ validation rows, else 0)",
    )
    _arg(
        g,
        "--refit",
        dest="refit",
        action="store_true",
        default=d.refit,
        help="after validation has chosen the epoch and calibrated the fallback, train again on every row (validation included) up to that epoch and ship that model (default auto: on below 8,192 training rows, except with --train_all)",
    )
    _arg(
        g,
        "--no_refit",
        dest="refit",
        action="store_false",
        help="ship the held-out run's model itself (trained without the validation rows)",
    )
    _arg(g, "--balanced_sampler", action="store_true", help="draw batches so every bucket is equally likely (for skewed buckets)")
    _arg(
        g,
        "--split_mode",
        choices=["stratified", "random"],
        default=d.split_mode,
        help="validation split: per response (stratified, default) or per family at random",
    )
    _arg(
        g,
        "--val_split",
        type=float,
        default=d.val_split,
        help=f"fraction held out for validation, checkpoint choice and fallback calibration (default {d.val_split})",
    )
    _arg(
        g,
        "--max_candidates_per_bucket",
        type=int,
        default=d.max_candidates_per_bucket,
        help=f"responses the head learns per bucket; the rest stay reachable by retrieval (default {d.max_candidates_per_bucket})",
    )
    _arg(g, "--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    _arg(
        g,
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=d.precision,
        help="arithmetic of the training passes: bf16 mixed precision (float32 weights, optimizer and loss) or fp32 (default auto: bf16 on CUDA with bf16 and on CPUs with AMX, where it is faster; fp32 elsewhere)",
    )
    _arg(
        g,
        "--neighbour_weight",
        type=float,
        default=d.neighbour_weight,
        help=f"weight of the neighbour vote in the answers: the 10 stored messages nearest a new one vote for their responses, mixed with the head's probabilities as (1 - w) * head + w * vote; the fallback is calibrated with it; 0 answers from the head alone (default {d.neighbour_weight})",
    )
    _arg(
        g,
        "--resume",
        action="store_true",
        help="continue a killed run from its last epoch (state saved beside --output); same flags required",
    )
    if not sweep:
        _arg(
            g,
            "--force",
            action="store_true",
            help="train even when a registered version was already trained on this table content with these settings and this code (by default that run is skipped: nothing changed)",
        )
    g = p.add_argument_group("preference loss (--pref_weight 0 turns it off)")
    _arg(
        g,
        "--pref_weight",
        type=float,
        default=d.pref_weight,
        help=f"weight w of the preference term: loss = CE + w * pref (default {d.pref_weight})",
    )
    _arg(
        g, "--pref_beta", type=float, default=d.pref_beta, help=f"beta: scale of the logit gap z_gold - z_negative (default {d.pref_beta})"
    )
    _arg(
        g,
        "--pref_objective",
        choices=["sigmoid", "repo_relu"],
        default=d.pref_objective,
        help="sigmoid: -log sigmoid(beta * gap) (DPO-style); repo_relu: max(0, margin - beta * gap) (RePO) (default sigmoid)",
    )
    _arg(g, "--pref_margin", type=float, default=d.pref_margin, help=f"margin of repo_relu (default {d.pref_margin})")
    _arg(g, "--pref_group_size", type=int, default=d.pref_group_size, help=f"negatives sampled per example (default {d.pref_group_size})")
    _arg(
        g,
        "--pref_group_estimator",
        choices=["mean", "epo"],
        default=d.pref_group_estimator,
        help="mean: average the pairwise losses; epo: compare with the group's expected logit under the model's softmax (default mean)",
    )
    _arg(
        g,
        "--hard_negative_ratio",
        type=float,
        default=d.hard_negative_ratio,
        help=f"probability an example's negatives are its highest-scoring wrong classes rather than random ones (default {d.hard_negative_ratio})",
    )
    _arg(
        g,
        "--adaptive_pref_weighting",
        action="store_true",
        help="weight each example's preference term by 1 - p(gold) (mean 1): separated examples stop pulling",
    )
    _arg(
        g,
        "--pref_warmup_epochs",
        type=float,
        default=d.pref_warmup_epochs,
        help="ramp the preference weight linearly from 0 over this many epochs (default 0)",
    )


def _run_config(a: argparse.Namespace, sweep: bool = False):
    """The run's ``TrainConfig`` and ``HeadSettings`` from the flags (every field has its flag),
    validated here, once, so a bad flag fails before Prefect starts. A sweep has no size of its own:
    its widths are checked against the largest, and each size keeps the widths it has."""
    from dataclasses import fields

    from models.heads import HeadSettings
    from models.train import TrainConfig

    train = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    head = {f.name: getattr(a, f.name, None) for f in fields(HeadSettings)}
    head["model_size"] = "xxlarge" if sweep else a.model_size
    return train, HeadSettings(**head)


def _engine_args(p: argparse.ArgumentParser) -> None:
    """The chat engine's flags (chat, eval, serve): the seed's chat_app.py flags plus thresholds."""
    from models.heads import SIZES
    from retrieval.styles import STYLES

    _arg(p, "--model", help=f"MLflow model URI (default models:/MODEL_NAME@{CHAMPION_ALIAS}: the champion of --model_name)")
    _model_name_arg(p, promote=False)
    _arg(p, "--weights", help="local weights file (with --meta) instead of --model")
    _arg(p, "--meta", help="local meta JSON (with --weights)")
    _arg(p, "--device", default="cpu", help="cpu or cuda (default cpu)")
    _arg(
        p,
        "--model_size",
        choices=["auto", *SIZES],
        default="auto",
        help="auto reads the size from the checkpoint (default); a size refuses a checkpoint of another size",
    )
    _arg(
        p,
        "--pool_mode",
        choices=["all", "top"],
        default="all",
        help="all: every bucket, weighted by its probability (default); top: only the --top_labels likeliest",
    )
    _arg(p, "--top_labels", type=int, default=3, help="buckets searched with --pool_mode top (default 3)")
    _arg(
        p,
        "--response_temperature",
        type=float,
        default=0.0,
        help="0 = always the best response (default); higher samples among the best, seeded by --seed",
    )
    _arg(p, "--llm_db", help="LanceDB folder to retrieve from (default: the table version the model pins)")
    _arg(p, "--db_top_k", type=int, default=20, help="rows retrieved per message (default 20)")
    _arg(
        p,
        "--style_mode",
        choices=list(STYLES),
        default="balanced",
        help="balanced: the stored response verbatim (default); concise: its first sentence; analyst: laid out as short answer + points; creative: with an opener/closer; auto: picked from cues in the message",
    )
    _arg(
        p,
        "--creativity",
        type=float,
        default=0.35,
        help="with the creative style, the chance (0-1) of an opener and of a closer (default 0.35)",
    )
    _arg(p, "--min_confidence", type=float, help="fall back below this confidence (default: calibrated at training)")
    _arg(
        p,
        "--min_margin",
        type=float,
        help="fall back when the answer leads the runner-up by less than this probability (default: calibrated at training)",
    )
    _arg(p, "--seed", type=int, default=0, help="seed for sampling and the creative style (default 0)")


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
    _arg(p, "--input", required=True, help="conversation JSONL (flat pairs or multi-turn) or a .parquet dataset")
    _expansion_args(p, target_required=True)

    p = sub.add_parser(
        "build-super",
        help="merge sources, filter, dedupe and expand",
        description="Merge several sources (each keeps its `source`), drop unusable pairs (too short/long, mostly non-text, echoes, control characters, broken encoding), exact and near duplicates, then expand to --target if it is larger. Writes the dataset (.jsonl + .parquet), a .rejects.jsonl with every dropped record and why, and a .report.json with counts per reason.",
    )
    _arg(p, "--inputs", nargs="+", required=True, help="conversation JSONL files or .parquet datasets")
    _expansion_args(p, target_required=False)
    _near_dup_arg(p)

    p = sub.add_parser("db", help="build or inspect the LanceDB conversation table")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    b = dbsub.add_parser(
        "build",
        help="embed, bucket and write a new table version",
        description="Embed every user message (cached by content hash), assign buckets, and write a new version of the table with a full-text index (and a vector index when large).",
    )
    _arg(b, "--data", required=True, help="conversation JSONL or .parquet dataset")
    _arg(b, "--db", required=True, help="LanceDB folder, e.g. llm_chat.db, or an object-store URI (s3://bucket/llm_chat.db)")
    _arg(b, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    _arg(b, "--num_buckets", type=int, default=10, help="response buckets (default 10)")
    _arg(b, "--seed", type=int, default=0, help="clustering seed (default 0)")
    _arg(b, "--device", default="cpu", help="encoder device (default cpu)")
    _arg(b, "--strict", action="store_true", help="stop at the first malformed line")
    s = dbsub.add_parser(
        "stats", help="rows, buckets, sources, versions and index state", description="Describe the latest version of the table."
    )
    _arg(s, "--db", required=True, help="LanceDB folder or object-store URI")
    _arg(s, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    _arg(s, "--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "finetune",
        help="train, log to MLflow, register, promote if better",
        description="Train the 10-bucket head on a pinned table version, log it to MLflow, register a version of `bucketchat` and move the `champion` alias only if it is at least as good on the same validation set.",
    )
    _arg(p, "--data", help="conversation data; (re)builds --db from it first. Without it, trains on the table as it is")
    _arg(p, "--db", default="llm_chat.db", help="LanceDB folder or object-store URI (default llm_chat.db)")
    _arg(p, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    _arg(p, "--table_version", type=int, help="table version to train on (default: the latest)")
    _arg(p, "--num_buckets", type=int, default=10, help="response buckets when building (default 10)")
    _arg(p, "--seed", type=int, default=42, help="seed for the split, init and sampling (default 42)")
    _arg(p, "--output", default="champion_model_chat_ft.pth", help="local weights file (safetensors; default champion_model_chat_ft.pth)")
    _arg(p, "--meta", default="chat_model_meta.json", help="local meta JSON (default chat_model_meta.json)")
    _arg(p, "--strict", action="store_true", help="stop at the first malformed line")
    _train_args(p)

    p = sub.add_parser(
        "size-sweep",
        help="train every head size on one table, for side-by-side comparison in MLflow",
        description="Train base, large, xlarge and xxlarge heads on the same table version (one MLflow run and registered version each, tagged model_size). The champion moves to whichever beats it on validation.",
    )
    _arg(p, "--data", help="conversation data; (re)builds --db from it first")
    _arg(p, "--db", default="llm_chat.db", help="LanceDB folder or object-store URI (default llm_chat.db)")
    _arg(p, "--table", default=TABLE_NAME, help=f"table name (default {TABLE_NAME})")
    _arg(p, "--table_version", type=int, help="table version to train on (default: the latest)")
    _arg(p, "--sizes", nargs="+", default=None, help="sizes to train (default: all four)")
    _arg(p, "--num_buckets", type=int, default=10, help="response buckets when building (default 10)")
    _arg(p, "--seed", type=int, default=42, help="seed (default 42)")
    _train_args(p, sweep=True)

    p = sub.add_parser("registry", help="list registered model versions, or roll the champion back")
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser("list", help="versions with their validation scores, sizes and aliases")
    _model_name_arg(r, promote=False)
    _arg(r, "--json", action="store_true", help="print JSON")
    r = rsub.add_parser("rollback", help="point the champion alias at an earlier version")
    _model_name_arg(r, promote=False)
    _arg(r, "--version", type=int, help="version to make champion (default: the newest one older than the current champion)")

    p = sub.add_parser(
        "chat",
        help="answer messages with the champion (or given weights)",
        description="Interactive on a terminal: the conversation keeps its history, so short follow-ups are read with the turn before; /why explains the last answer, /reset starts over, /help lists commands, `exit` quits. With piped input, answers each line as its own conversation.",
    )
    _engine_args(p)
    _arg(p, "--json", action="store_true", help="print one JSON object per answer")
    _arg(p, "--echo", action="store_true", help="with piped input, print each message before its answer")
    _arg(
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
    _arg(p, "--data", required=True, help="test JSONL: each line's assistant text is the expected response")
    _arg(p, "--oos", help="JSONL (or plain text, one message per line) of messages the bot should not answer")
    _engine_args(p)
    _arg(p, "--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser(
        "serve",
        help="HTTP server: OpenAI-compatible chat completions and a chat page",
        description="Serve the chat engine over HTTP: POST /v1/chat/completions (OpenAI-compatible, stream too), GET /v1/models, GET /healthz, and a chat page at /. The model and table load once.",
    )
    _engine_args(p)
    _arg(p, "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    _arg(p, "--port", type=int, default=8000, help="port (default 8000)")
    _arg(p, "--api_key", help="require `Authorization: Bearer KEY` on /v1 (default: $BUCKETCHAT_API_KEY, else no key)")
    _arg(p, "--max_concurrency", type=int, default=64, help="answers in flight at once; more get 429 (default 64)")
    _arg(p, "--workers_threads", type=int, default=2, help="threads answering requests (default 2: one per core here)")

    p = sub.add_parser(
        "pipeline",
        help="the whole chain on embedded defaults",
        description="Prepare (merge, filter, dedupe) -> [expand] -> build the table -> train -> register -> promote. Everything goes under --workdir; runs are tracked in MLFLOW_TRACKING_URI (default: mlflow/ in the project).",
    )
    _arg(p, "--data", nargs="+", required=True, help="conversation JSONL files")
    _arg(p, "--workdir", help="folder for everything the run makes (default .bucketchat/work in the project)")
    _arg(
        p,
        "--db",
        help="LanceDB location for the table: a folder or an object-store URI such as s3://bucket/bucketchat.db (default WORKDIR/llm_chat.db)",
    )
    _arg(
        p,
        "--target",
        type=int,
        help="expand the dataset to this many records first (default: no expansion; on held-out BANKING77 rows it no longer helped the head, see README)",
    )
    _arg(p, "--creative_prob", type=float, default=0.0, help="see `bucketchat expand`")
    _arg(p, "--blend_prob", type=float, default=0.0, help="see `bucketchat expand`")
    _arg(p, "--num_buckets", type=int, default=10, help="response buckets (default 10)")
    _arg(p, "--seed", type=int, default=42, help="seed (default 42)")
    _arg(p, "--strict", action="store_true", help="stop at the first malformed line")
    _near_dup_arg(p, action="keep a pair in its twin's family (never split across train/validation)")
    _train_args(p)

    p = sub.add_parser(
        "retrain",
        help="retrain from a folder of data drops; the champion moves only if better",
        description="Run the pipeline over every *.jsonl in --data_dir (what the scheduled `retrain` deployment does). Unchanged data is neither re-read, re-deduplicated nor re-embedded; an unchanged folder writes no table version and trains nothing. A new model is registered and becomes champion only if it beats the champion on validation; the output says why.",
    )
    _arg(p, "--data_dir", required=True, help="folder of conversation JSONL drops (*.rejects.jsonl files are skipped)")
    _arg(p, "--workdir", help="as in `bucketchat pipeline` (default .bucketchat/work in the project)")
    _arg(p, "--target", type=int, help="as in `bucketchat pipeline` (default: no expansion)")
    _arg(p, "--force", action="store_true", help="train even when nothing changed")
    _model_name_arg(p, promote=False)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``-v/--verbose`` before or after the command name, on every subcommand."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="stream Prefect's and MLflow's logs and show tracebacks",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub, top=False)


def _preflight(paths: list[str], strict: bool, flag: str = "--data") -> None:
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


def _report_rejects(result: dict) -> None:
    n = result.get("rejected_lines") or 0
    if n:
        print(f"{n} malformed line(s) skipped; see {result.get('rejects')}", file=sys.stderr)


def cmd_expand(a) -> None:
    _preflight([a.input], a.strict, "--input")
    _start_api()
    from flows.expand import expand_flow

    with _orchestrated():
        r = expand_flow(a.input, a.output, a.target, a.creative_prob, a.blend_prob, a.seed, a.strict)
    _report_rejects(r)
    print(f"wrote {r['records']} records ({r['records'] - r['input_records']} new) to {r['jsonl']} and {r['parquet']}")
    dropped = r["inconsistent_variants"]
    print(
        f"variants dropped by the consistency check: {sum(dropped.values())}"
        + (f" ({', '.join(f'{n} {k}' for k, n in sorted(dropped.items()))})" if dropped else "")
    )


def cmd_build_super(a) -> None:
    _preflight(a.inputs, a.strict, "--inputs")
    _start_api()
    from flows.build_super import build_super_flow

    with _orchestrated():
        r = build_super_flow(a.inputs, a.output, a.target, a.creative_prob, a.blend_prob, a.seed, a.strict, a.near_dup_threshold)
    _report_rejects(r)
    print(f"wrote {r['records']} records to {r['jsonl']} and {r['parquet']}")
    print(
        "dropped: "
        + (", ".join(f"{n} {reason}" for reason, n in sorted(r["dropped"].items())) or "nothing")
        + f" (records in {r['rejects']}, counts in {r['report']})"
    )


def cmd_db(a) -> None:
    if a.db_command == "build":
        _preflight([a.data], a.strict)
        _start_api()
        from flows.build_db import build_db_flow

        with _orchestrated():
            r = build_db_flow(a.data, a.db, a.table, a.num_buckets, a.seed, a.device, a.strict)
        _report_rejects(r)
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


def _check_weights(spec: str | None) -> None:
    if spec and not spec.startswith(("models:/", "runs:/")) and not Path(spec).is_file():
        raise FileNotFoundError(
            f"--weights {spec!r} does not exist; pass a checkpoint written by `bucketchat finetune` or a models:/bucketchat/N URI"
        )


def cmd_finetune(a) -> None:
    train, head = _run_config(a)
    _check_weights(a.weights)
    _preflight([a.data] if a.data else [], a.strict)
    _start_api()
    from flows.finetune import finetune_flow

    with _orchestrated():
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
    _report(r, a.model_name)
    print(f"local checkpoint: {a.output} + {a.meta}")


def cmd_size_sweep(a) -> None:
    train, head = _run_config(a, sweep=True)
    _preflight([a.data] if a.data else [], False)
    _start_api()
    from flows.size_sweep import size_sweep_flow

    with _orchestrated():
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


def _report(r: dict, name: str) -> None:
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


def _report_table(b: dict) -> None:
    print(
        f"table: {b['db']} version {b['version']} ({b['rows']} rows, "
        + ("unchanged: no new version written)" if b.get("reused") else f"{b['embedded']} newly embedded)")
    )


def cmd_pipeline(a) -> None:
    train, head = _run_config(a)
    _preflight(a.data, a.strict)
    _check_weights(a.weights)
    _start_api()
    from flows.pipeline import pipeline_flow

    with _orchestrated():
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
    _report_table(r["build"])
    _report(r, a.model_name)
    print(f"workdir: {r['workdir']}")


def cmd_retrain(a) -> None:
    folder = Path(a.data_dir)
    if not folder.is_dir():
        raise ValueError(f"--data_dir {a.data_dir!r} is not a folder; pass the folder the data drops (*.jsonl) are put in")
    _start_api()
    from flows.retrain import retrain_flow

    with _orchestrated():
        r = retrain_flow(a.data_dir, a.workdir, a.target, force=a.force, model_name=a.model_name)
    print(f"{len(r['drops'])} drop(s) in {a.data_dir}; dataset {r['dataset']['records']} pairs")
    _report_table(r["build"])
    _report(r, a.model_name)


def _load_engine(a):
    from retrieval.answer import ChatEngine, ChatOptions
    from tasks import registry

    if bool(a.weights) != bool(a.meta):
        raise ValueError("--weights and --meta go together; pass both, or neither to use --model")
    a.model = a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}"
    weights, meta = (a.weights, a.meta) if a.weights else registry.download_model(a.model)
    opts = ChatOptions(
        device=a.device,
        model_size=a.model_size,
        pool_mode=a.pool_mode,
        top_labels=a.top_labels,
        response_temperature=a.response_temperature,
        llm_db=a.llm_db,
        db_top_k=a.db_top_k,
        min_confidence=a.min_confidence,
        min_margin=a.min_margin,
        style_mode=a.style_mode,
        creativity=a.creativity,
        seed=a.seed,
    )
    return ChatEngine(str(weights), str(meta), opts)


REPL_HELP = """commands:
  /why     the buckets, candidates, scores and source records behind the last answer
  /reset   forget the conversation so far (follow-ups are read with earlier turns)
  /help    this list
  exit     quit"""


def _print_why(why: dict) -> None:
    print("  buckets: " + ", ".join(f"{b['bucket']} ({b['probability']:.1%})" for b in why["buckets"]))
    t = why["thresholds"]
    print(
        f"  confidence {why['confidence']:.4f} (falls back below {t['min_confidence']:.4f}), lead over runner-up {why['margin']:.4f} (below {t['min_margin']:.4f})"
        + (" -> FALLBACK" if why["fallback"] else "")
    )
    if why["context"]:
        print(f"  read as a follow-up of: {why['context']!r}")
    for i, c in enumerate(why["candidates"], start=1):
        print(f"  {i}. [{c['from']}, bucket {c['bucket']}, log score {c['score']:.3f}] {c['response'][:100]}")
        for r in c["records"]:
            print(f'       from {r["id"]}  "{(r["user"] or "")[:80]}"')


def cmd_chat(a) -> None:
    from conversations.text import TextError, json_line
    from retrieval.answer import Conversation

    engine = _load_engine(a)
    if sys.stdin.isatty():
        pinned = engine.meta.get("table", {})
        print(
            f"bucketchat — model from {a.weights or a.model}, table {pinned.get('name')} v{pinned.get('version')}. /help for commands, 'exit' to quit."
        )
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
                    elif a.json:
                        print(json.dumps(engine.explain(convo.last), ensure_ascii=False, indent=2))
                    else:
                        _print_why(engine.explain(convo.last))
                else:
                    print(f"unknown command {command}; /help lists them")
                continue
            try:
                ans = convo.say(message)
            except TextError as exc:
                print(f"({exc})")
                continue
            print(json_line({"message": message, **ans.to_dict()}), end="") if a.json else print(f"bot> {ans.response}")
        return
    # Bytes, so that a line of invalid UTF-8 is one line's error rather than the end of the batch.
    stdin = getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8", "surrogatepass"))
    failed = answer_lines(engine, stdin, sys.stdout.buffer, a.json, a.echo)
    if failed and a.strict:
        raise SystemExit(1)


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


def cmd_eval(a) -> None:
    from retrieval.evaluate import evaluate, format_report

    engine = _load_engine(a)
    report = evaluate(engine, a.data, a.oos)
    print(json.dumps(report, indent=2) if a.json else format_report(report))


def cmd_serve(a) -> None:
    import os

    from interfaces.server import ServerConfig, serve

    a.model = a.model or f"models:/{a.model_name}@{CHAMPION_ALIAS}"
    cfg = ServerConfig(
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("BUCKETCHAT_API_KEY") or None,
        max_concurrency=a.max_concurrency,
        threads=a.workers_threads,
        model_name=a.weights or a.model,
    )
    engine = _load_engine(a)
    # The server writes nothing, so a signal may end it at once: raising inside uvicorn's start-up
    # would leave a half-made event loop to complain at exit. uvicorn puts its own graceful handler
    # in place while it runs, and raises the signal again after shutting down: it lands here.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _stop_now(_NAME[0], signum))
    serve(engine, cfg)


COMMANDS = {
    "expand": cmd_expand,
    "build-super": cmd_build_super,
    "db": cmd_db,
    "finetune": cmd_finetune,
    "size-sweep": cmd_size_sweep,
    "registry": cmd_registry,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "serve": cmd_serve,
    "pipeline": cmd_pipeline,
    "retrain": cmd_retrain,
}


# After Ctrl-C or SIGTERM a command gets this long to record how its runs ended, then exits anyway.
STOP_GRACE_S = 1.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised in the main thread (a KeyboardInterrupt, so Prefect records the
    run as crashed by an interrupt and libraries unwind as they do for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_NAME = ["bucketchat"]  # "bucketchat COMMAND" once main has parsed the arguments
_stopping: list[int] = []  # the signal, once a stop has begun
_said = threading.Lock()


def _stop_now(name: str, signum: int) -> None:
    """Say once why the command stopped, and exit without waiting for anything else: what a run
    must record (its crashed state) was recorded while the exception unwound, every file is written
    atomically, and the local Prefect server goes with this process (flows/orchestration.py).
    A run whose unwinding the grace period cut short is marked Crashed here, not left Running."""
    if not _said.acquire(blocking=False):
        time.sleep(1.0)  # the other thread is saying it, and ends the process when it has
        os._exit(128 + signum)
    if "prefect" in sys.modules:
        try:
            from flows.orchestration import crash_dead_runs

            crash_dead_runs(own=True, timeout=0.4)
        except Exception:  # noqa: BLE001 - stopping anyway; the next command marks them
            pass
    sys.stderr.write(
        f"\n{name}: stopped by {signal.Signals(signum).name}; files it writes are replaced whole, so nothing half-written was kept (run it again to continue)\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(128 + signum)


def _begin_stop(name: str, signum: int) -> None:
    """Start the grace period once: whatever is still unwinding when it ends is cut short."""
    if not _stopping:
        _stopping.append(signum)
        timer = threading.Timer(STOP_GRACE_S, _stop_now, args=(name, signum))
        timer.daemon = True
        timer.start()


def _watch_signals() -> None:
    """Start the grace period on every Ctrl-C or SIGTERM, also the ones a library's own handler
    takes (Prefect raises its own exception for SIGTERM inside a flow run): the kernel-level
    handler writes each signal's number to this pipe whichever Python handler then runs."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while data := os.read(read, 1):
            if data[0] in (signal.SIGINT, signal.SIGTERM):
                _begin_stop(_NAME[0], data[0])

    threading.Thread(target=watch, name="bucketchat-signals", daemon=True).start()


def _on_signal(signum: int, frame) -> None:
    name = _NAME[0]
    if _stopping:  # a second Ctrl-C: now
        _stop_now(name, signum)
    _begin_stop(name, signum)
    raise Interrupted(signum)


def _signal_of(exc: BaseException | None) -> int | None:
    """The signal behind ``exc``, also when a library turned it into another exception on the way
    (transformers' lazy imports re-raise anything as ModuleNotFoundError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if type(exc).__name__ == "TerminationSignal":  # Prefect's own SIGTERM handler, inside a flow run
            return getattr(exc, "signal", signal.SIGTERM)
        exc = exc.__cause__ or exc.__context__
    return _stopping[0] if _stopping else None


def _quiet(verbose: bool) -> None:
    """Libraries log to the console only with --verbose; a failure is then our one line, not
    Prefect's tracebacks. Must run before prefect is imported (it reads its settings once)."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


_API = []  # the LocalApi this command started, if any (chat, serve, eval, registry never start one)


def _api_configured() -> bool:
    """A Prefect API to use already: PREFECT_API_URL, or (prefect already imported, e.g. under a
    test harness) Prefect's own settings."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return False


def _start_api() -> None:
    """After a command's inputs are checked: start the local Prefect API unless one is configured.
    It boots while the command imports torch, Prefect and LanceDB; ``_orchestrated`` waits for it."""
    if _API or _api_configured():
        return
    from flows.orchestration import LocalApi
    from tasks.settings import state_home

    api = LocalApi(state_home() / "logs" / "prefect-api.log")
    api.start()
    _API.append(api)


@contextlib.contextmanager
def _orchestrated():
    """Around a flow call: the API is up, runs of dead processes are marked crashed, and this
    process's runs carry its runner tag."""
    import prefect

    from flows.orchestration import TAG, crash_dead_runs, runner_tag

    for api in _API:
        api.wait()
    crash_dead_runs()
    with prefect.tags(TAG, runner_tag()):
        yield


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 failed, 2 bad input or arguments (one line saying
    which and the fix), 128 + N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM)."""
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _quiet(verbose)
    apply_environment()  # before anything imports prefect: it reads its settings once
    name = _NAME[0] = f"bucketchat {args.command}"
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        _watch_signals()
    from conversations.records import RecordError

    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RecordError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        signum = _signal_of(exc)
        if signum is not None:
            _stop_now(name, signum)
        if isinstance(exc, SystemExit):
            raise
        if verbose:
            traceback.print_exc()
        print(f"{name}: failed: {type(exc).__name__}: {exc} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():  # main() called in-process (tests) leaves them as they were
            signal.signal(sig, handler)
        if handlers:
            signal.set_wakeup_fd(-1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
