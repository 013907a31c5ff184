"""The flags commands share, with the seed's names: training (every ``TrainConfig`` and
``HeadSettings`` field has its flag, defaults read from the dataclasses), the chat engine's, expansion
and the bot's model name. Each flag has its ``--kebab-case`` twin."""

from __future__ import annotations

import argparse

from tasks.settings import MODEL_NAME


def arg(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--snake_name`` and its ``--kebab-name`` twin."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def expansion_args(p: argparse.ArgumentParser, target_required: bool) -> None:
    arg(p, "--output", required=True, help="output dataset (.jsonl; a .parquet twin and a .rejects.jsonl are written beside it)")
    arg(p, "--target", type=int, required=target_required, help="number of records to grow the dataset to (exactly)")
    arg(
        p,
        "--creative_prob",
        type=float,
        default=0.0,
        help="probability a variant also gets a conversational opener on the assistant side (default 0)",
    )
    arg(p, "--blend_prob", type=float, default=0.0, help="probability a variant joins two user messages that share a response (default 0)")
    arg(p, "--seed", type=int, default=42, help="random seed; the same seed gives the same output (default 42)")
    arg(p, "--strict", action="store_true", help="stop at the first malformed line instead of writing it to the rejects file")


def model_name_arg(p: argparse.ArgumentParser, promote: bool = True) -> None:
    """The bot a command works on: its registered model, whose ``champion`` alias is what chat serves."""
    arg(
        p,
        "--model_name",
        type=model_name_type,
        default=MODEL_NAME,
        help=f"the bot: the registered model its versions and champion belong to; one name per bot, so two bots never replace each other's champion (default {MODEL_NAME})",
    )
    if promote:
        arg(
            p,
            "--replace_champion",
            action="store_true",
            help="let the new model become champion even when it shares under half of its responses with the current champion (by default such a model is registered but not promoted: it looks like another bot)",
        )


def model_name_type(value: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a usable model name; use letters, digits, '_', '.' and '-' (e.g. support-bot)")
    return value


def near_dup_arg(p: argparse.ArgumentParser, action: str = "drop a pair") -> None:
    arg(
        p,
        "--near_dup_threshold",
        type=float,
        default=0.9,
        help=f"{action} whose user and assistant text are both at least this similar (character edit similarity, 0-1) to an earlier pair with the same context (default 0.9)",
    )


def train_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Every training flag of the seed, defaults from ``TrainConfig``/``HeadSettings`` (one source)."""
    from models.config import SIZES, HeadSettings, TrainConfig

    d = TrainConfig()
    model_name_arg(p)
    g = p.add_argument_group("model")
    if not sweep:
        arg(
            g,
            "--model_size",
            choices=SIZES,
            default=HeadSettings.model_size,
            help=f"head size: base (MLP), large (+1 adapter branch), xlarge (+2, learned router), xxlarge (+3) (default {HeadSettings.model_size})",
        )
    arg(g, "--expansion_dim", type=int, help="width of the first adapter branch (large and up; default 768, xlarge 896, xxlarge 1024)")
    arg(g, "--extra_expansion_dim", type=int, help="width of the second branch (xlarge and up; default 1536, xxlarge 2048)")
    arg(g, "--third_expansion_dim", type=int, help="width of the third branch (xxlarge; default 3072)")
    arg(g, "--hidden_dim", type=int, help="hidden width of the head (default 1024, or the --weights checkpoint's)")
    arg(g, "--dropout", type=float, help="dropout in the head (default 0.5, or the --weights checkpoint's)")
    arg(
        g,
        "--weights",
        help="warm start: a local checkpoint or a models:/NAME/VERSION (models:/bucketchat@champion) URI; tensors are matched by name and shape (candidates by response text) and a report says which matched",
    )
    arg(
        g,
        "--train_all",
        action="store_true",
        help="fine-tune the sentence encoder too (minutes per epoch on CPU); the table then gets a new version embedded by the fine-tuned encoder, which the model pins",
    )
    arg(g, "--encoder_lr", type=float, default=d.encoder_lr, help=f"learning rate of the encoder with --train_all (default {d.encoder_lr})")
    g = p.add_argument_group("optimisation")
    arg(
        g,
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"maximum epochs (default {d.epochs}; with 500+ validation rows early stopping usually ends sooner)",
    )
    arg(
        g,
        "--batch_size",
        type=int,
        default=d.batch_size,
        help="examples per micro-batch (default auto: 64 below 8,192 training rows, else 512)",
    )
    arg(
        g,
        "--grad_accum_steps",
        type=int,
        default=d.grad_accum_steps,
        help="micro-batches per optimizer step: effective batch = batch_size x this (default 1)",
    )
    arg(
        g,
        "--lr",
        type=float,
        default=d.lr,
        help="AdamW learning rate of the head (default auto: 0.001 with batches of 64 or less, 0.002 up to 256, else 0.003)",
    )
    arg(g, "--lexical_lr", type=float, default=d.lexical_lr, help=f"learning rate of the hashed n-gram weights (default {d.lexical_lr})")
    arg(
        g,
        "--lexical_features",
        type=int,
        help="hashed n-gram buckets of the lexical path; 0 turns it off (default: up to 32768, fewer for heads with many candidates)",
    )
    arg(g, "--weight_decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    arg(
        g,
        "--lr_schedule",
        choices=["cosine", "linear", "constant"],
        default=d.lr_schedule,
        help=f"learning-rate schedule after warm-up (default {d.lr_schedule})",
    )
    arg(g, "--warmup_steps", type=int, default=d.warmup_steps, help="optimizer steps of linear learning-rate warm-up (default 0)")
    arg(
        g,
        "--label_smoothing",
        type=float,
        default=d.label_smoothing,
        help=f"bucket cross-entropy label smoothing (default {d.label_smoothing})",
    )
    arg(
        g,
        "--ema_decay",
        type=float,
        default=d.ema_decay,
        help="keep an EMA shadow of the weights with this decay (e.g. 0.999); the best checkpoint is then picked and kept on the EMA weights (default 0 = off)",
    )
    arg(
        g,
        "--no_ema_select",
        dest="ema_select",
        action="store_false",
        help="with --ema_decay, pick the best checkpoint on the live weights instead of the EMA ones",
    )
    arg(
        g,
        "--select_metric",
        choices=["response_acc", "loss", "last"],
        default=d.select_metric,
        help="which epoch's weights are kept: best validation response accuracy, lowest validation loss, or the last (default auto: response_acc with 500+ validation rows, else last: fewer rows cannot tell epochs apart)",
    )
    arg(
        g,
        "--early_stop_patience",
        type=int,
        default=d.early_stop_patience,
        help="epochs without a better validation score before stopping; the best checkpoint is kept; 0 = off (default auto: 6 with 500+ validation rows, else 0)",
    )
    arg(
        g,
        "--refit",
        dest="refit",
        action="store_true",
        default=d.refit,
        help="after validation has chosen the epoch and calibrated the fallback, train again on every row (validation included) up to that epoch and ship that model (default auto: on below 8,192 training rows, except with --train_all)",
    )
    arg(
        g,
        "--no_refit",
        dest="refit",
        action="store_false",
        help="ship the held-out run's model itself (trained without the validation rows)",
    )
    arg(g, "--balanced_sampler", action="store_true", help="draw batches so every bucket is equally likely (for skewed buckets)")
    arg(
        g,
        "--split_mode",
        choices=["stratified", "random"],
        default=d.split_mode,
        help="validation split: per response (stratified, default) or per family at random",
    )
    arg(
        g,
        "--val_split",
        type=float,
        default=d.val_split,
        help=f"fraction held out for validation, checkpoint choice and fallback calibration (default {d.val_split})",
    )
    arg(
        g,
        "--val_max_rows",
        type=int,
        default=d.val_max_rows,
        help=f"at most this many rows held out, whatever --val_split gives on a big table (default {d.val_max_rows:,})",
    )
    arg(
        g,
        "--max_candidates_per_bucket",
        type=int,
        default=d.max_candidates_per_bucket,
        help=f"responses the head learns per bucket; the rest stay reachable by retrieval (default {d.max_candidates_per_bucket})",
    )
    arg(g, "--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    arg(
        g,
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=d.precision,
        help="arithmetic of the training passes: bf16 mixed precision (float32 weights, optimizer and loss) or fp32 (default auto: bf16 on CUDA with bf16 and on CPUs with AMX, where it is faster; fp32 elsewhere)",
    )
    arg(
        g,
        "--neighbour_weight",
        type=float,
        default=d.neighbour_weight,
        help=f"weight of the neighbour vote in the answers: the 10 stored messages nearest a new one vote for their responses, mixed with the head's probabilities as (1 - w) * head + w * vote; the fallback is calibrated with it; 0 answers from the head alone (default {d.neighbour_weight})",
    )
    arg(
        g,
        "--fallback_budget",
        type=float,
        default=d.fallback_budget,
        help=f"share of right answers the fallback may cost, calibrated on validation: half to the similarity gate (questions unlike the data), half to confidence and margin; raise it to catch more off-topic questions (see `bucketchat eval --oos`), 0 for no fallback (default {d.fallback_budget})",
    )
    arg(
        g,
        "--resume",
        action="store_true",
        help="continue a killed run from its last epoch (state saved beside --output); same flags required",
    )
    if not sweep:
        arg(
            g,
            "--force",
            action="store_true",
            help="train even when a registered version was already trained on this table content with these settings and this code (by default that run is skipped: nothing changed)",
        )
    g = p.add_argument_group("preference loss (--pref_weight 0 turns it off)")
    arg(
        g,
        "--pref_weight",
        type=float,
        default=d.pref_weight,
        help=f"weight w of the preference term: loss = CE + w * pref (default {d.pref_weight})",
    )
    arg(g, "--pref_beta", type=float, default=d.pref_beta, help=f"beta: scale of the logit gap z_gold - z_negative (default {d.pref_beta})")
    arg(
        g,
        "--pref_objective",
        choices=["sigmoid", "repo_relu"],
        default=d.pref_objective,
        help="sigmoid: -log sigmoid(beta * gap) (DPO-style); repo_relu: max(0, margin - beta * gap) (RePO) (default sigmoid)",
    )
    arg(g, "--pref_margin", type=float, default=d.pref_margin, help=f"margin of repo_relu (default {d.pref_margin})")
    arg(g, "--pref_group_size", type=int, default=d.pref_group_size, help=f"negatives sampled per example (default {d.pref_group_size})")
    arg(
        g,
        "--pref_group_estimator",
        choices=["mean", "epo"],
        default=d.pref_group_estimator,
        help="mean: average the pairwise losses; epo: compare with the group's expected logit under the model's softmax (default mean)",
    )
    arg(
        g,
        "--hard_negative_ratio",
        type=float,
        default=d.hard_negative_ratio,
        help=f"probability an example's negatives are its highest-scoring wrong classes rather than random ones (default {d.hard_negative_ratio})",
    )
    arg(
        g,
        "--adaptive_pref_weighting",
        action="store_true",
        help="weight each example's preference term by 1 - p(gold) (mean 1): separated examples stop pulling",
    )
    arg(
        g,
        "--pref_warmup_epochs",
        type=float,
        default=d.pref_warmup_epochs,
        help="ramp the preference weight linearly from 0 over this many epochs (default 0)",
    )


def encoder_arg(p: argparse.ArgumentParser) -> None:
    arg(
        p,
        "--encoder",
        metavar="FOLDER",
        help="a sentence-transformers model saved on disk to embed with (default: the shipped all-MiniLM-L6-v2, int8). "
        "It is copied beside the table; models trained on the table answer with it. Loaded offline: nothing is downloaded",
    )


def check_encoder(a: argparse.Namespace) -> None:
    """A bad --encoder folder fails before anything starts, naming what is missing."""
    if getattr(a, "encoder", None):
        from retrieval.encoder import check_encoder_folder

        a.encoder = str(check_encoder_folder(a.encoder))


def column_args(p: argparse.ArgumentParser) -> None:
    """Which columns of a table input (.csv, .tsv, .parquet) hold what; JSONL and JSON ignore them."""
    g = p.add_argument_group("table inputs (.csv, .tsv, .parquet)")
    arg(g, "--user_col", default="user", help="column holding the user's message (default user)")
    arg(g, "--assistant_col", default="assistant", help="column holding the stored response (default assistant)")
    arg(g, "--label_col", help="column holding an intent/label (default: intent, label or bucket when present)")


def columns(a: argparse.Namespace):
    """The ``Columns`` the column flags name, or None when they are all at their defaults."""
    from conversations.records import Columns

    cols = Columns(user=a.user_col, assistant=a.assistant_col, label=a.label_col)
    return None if cols == Columns() else cols


def run_config(a: argparse.Namespace, sweep: bool = False):
    """The run's ``TrainConfig`` and ``HeadSettings`` from the flags (every field has its flag),
    validated here, once, so a bad flag fails before Prefect starts. A sweep has no size of its own:
    its widths are checked against the largest, and each size keeps the widths it has."""
    from dataclasses import fields

    from models.config import HeadSettings, TrainConfig

    train = TrainConfig(**{f.name: getattr(a, f.name) for f in fields(TrainConfig)})
    head = {f.name: getattr(a, f.name, None) for f in fields(HeadSettings)}
    head["model_size"] = "xxlarge" if sweep else a.model_size
    return train, HeadSettings(**head)


def add_verbose(parser: argparse.ArgumentParser, top: bool = True) -> None:
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
                add_verbose(sub, top=False)


def dask_args(p: argparse.ArgumentParser) -> None:
    """Where new rows are embedded: this process (default) or a Dask cluster (flows/build_db.py)."""
    arg(
        p,
        "--dask_workers",
        type=int,
        default=0,
        help="embed new rows as mapped tasks on a local Dask cluster of this many worker processes (each loads the encoder once; default 0: this process)",
    )
    arg(
        p,
        "--dask_address",
        help="embed new rows on a running Dask cluster, e.g. tcp://scheduler:8786 (its workers need bucketchat installed)",
    )
