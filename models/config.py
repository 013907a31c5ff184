"""The run config: ``TrainConfig`` (how a head trains) and ``HeadSettings`` (which head, completed
from the data into a ``HeadConfig``), each validated once in ``__post_init__``; ``TrainConfig.resolve``
makes the automatic settings (batch size, rate, epoch selection, refit, precision) concrete for the
data. The CLI's flags, the flows' parameters, the MLflow params and the checkpoint's meta all come
from here. Plain dataclasses: importing this module loads no torch, so the command parses and checks
its flags at once. Why each default is what it is: BENCHMARKS.md, "Trials behind the defaults"."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SIZES = ("base", "large", "xlarge", "xxlarge")
BRANCHES = {"base": 0, "large": 1, "xlarge": 2, "xxlarge": 3}


# Default branch widths per size when the flags are not given (the seed's examples use these ranges).
DEFAULT_EXPANSION = {"large": (768,), "xlarge": (896, 1536), "xxlarge": (1024, 2048, 3072)}


EXPANSION_FLAGS = ("--expansion_dim", "--extra_expansion_dim", "--third_expansion_dim")
# The preference term's objectives and group estimators (models/losses.py).
OBJECTIVES = ("sigmoid", "repo_relu")
ESTIMATORS = ("mean", "epo")


def n_features_for(num_outputs: int, budget: int = 4_000_000, most: int = 2**15, least: int = 2**12) -> int:
    """Hash buckets of the n-gram path (models/lexical.py) for a head with ``num_outputs`` logits: a
    power of two keeping its weights near ``budget`` parameters (16 MB), between ``least`` and ``most``."""
    n = most
    while n > least and n * num_outputs > budget:
        n //= 2
    return n


@dataclass
class HeadConfig:
    num_candidates: int
    input_dim: int = 384
    num_buckets: int = 10
    hidden_dim: int = 1024
    dropout: float = 0.5
    model_size: str = SIZES[0]
    expansion_dim: int | None = None
    extra_expansion_dim: int | None = None
    third_expansion_dim: int | None = None
    # Hashed n-gram buckets of the lexical path (models/lexical.py); None: sized from the outputs, 0: off.
    lexical_features: int | None = None

    def __post_init__(self):
        if self.model_size not in SIZES:
            raise ValueError(f"--model_size {self.model_size!r} is not available; choose one of {', '.join(SIZES)}")
        if self.num_buckets < 2:
            raise ValueError(f"--num_buckets must be at least 2, got {self.num_buckets}")
        if self.num_candidates < 1:
            raise ValueError("the head needs at least one response candidate; the training data has none")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim < 1:
            raise ValueError(f"--hidden_dim must be at least 1, got {self.hidden_dim}")
        n = BRANCHES[self.model_size]
        given = [self.expansion_dim, self.extra_expansion_dim, self.third_expansion_dim]
        for i, (flag, value) in enumerate(zip(EXPANSION_FLAGS, given)):
            if value is None:
                continue
            if i >= n:
                needs = [s for s, k in BRANCHES.items() if k > i]
                raise ValueError(
                    f"{flag} needs --model_size {' or '.join(needs)} (got --model_size {self.model_size}); drop the flag or pick a larger size"
                )
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.lexical_features is None:
            self.lexical_features = n_features_for(self.num_buckets + self.num_candidates)
        if self.lexical_features < 0:
            raise ValueError(f"--lexical_features must be 0 (off) or positive, got {self.lexical_features}")
        # Fill the widths once, here, so the saved config says exactly what was built.
        defaults = DEFAULT_EXPANSION.get(self.model_size, ())
        widths = [g if g is not None else (defaults[i] if i < len(defaults) else None) for i, g in enumerate(given)]
        self.expansion_dim, self.extra_expansion_dim, self.third_expansion_dim = widths

    @property
    def branch_dims(self) -> list[int]:
        return [d for d in (self.expansion_dim, self.extra_expansion_dim, self.third_expansion_dim)[: BRANCHES[self.model_size]]]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadSettings:
    """The head a run asks for: the part of ``HeadConfig`` a user chooses (the rest follows from the
    data). None leaves a setting to the warm-start checkpoint, else to ``HeadConfig``'s default.
    Validated here, once, by building the config it describes."""

    model_size: str = SIZES[0]
    hidden_dim: int | None = None
    dropout: float | None = None
    expansion_dim: int | None = None
    extra_expansion_dim: int | None = None
    third_expansion_dim: int | None = None
    lexical_features: int | None = None
    num_buckets: int = 10

    def __post_init__(self):
        HeadConfig(num_candidates=1, **self.given())

    def given(self) -> dict:
        """The settings that are set (not None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def for_size(self, size: str) -> HeadSettings:
        """The same settings at another size, keeping only the branch widths that size has."""
        widths = {k: None for i, k in enumerate(BRANCH_WIDTHS) if i >= BRANCHES[size]}
        return HeadSettings(**{**asdict(self), **widths, "model_size": size})


HEAD_SETTINGS = tuple(HeadSettings.__dataclass_fields__)


BRANCH_WIDTHS = ("expansion_dim", "extra_expansion_dim", "third_expansion_dim")


SCHEDULES = ("cosine", "linear", "constant")


SPLIT_MODES = ("stratified", "random")


SELECT_METRICS = ("response_acc", "loss", "last")


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_is_fast(device: str) -> bool:
    import torch

    """Whether bfloat16 matmuls beat float32 on ``device``: CUDA with bf16 support, or a CPU with AMX
    tiles. CPUs without AMX emulate bf16 and would get slower, so they keep fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    return False


@dataclass
class TrainConfig:
    # Defaults chosen on splits *of BANKING77 train*, never its test file (tests/bench/train_split.py;
    # the trials: BENCHMARKS.md, "Trials behind the defaults: training"). batch_size/lr None = auto
    # (``resolve``): small data needs more, smaller steps; large data trains faster in big batches.
    epochs: int = 60
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    val_split: float = 0.1
    # At most this many rows held out, however big the table: 10k validation rows measure accuracy
    # to about +-0.6 points, and the neighbour vote they are calibrated with costs validation x
    # training rows (at 1M rows and a 10 % split: 100k x 900k, most of an hour on two cores).
    val_max_rows: int = 10_000
    split_mode: str = "stratified"
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    ema_decay: float = 0.0  # 0 = no EMA shadow
    ema_select: bool = True  # with an EMA shadow, pick and keep the best checkpoint on the EMA weights
    # select_metric / early_stop_patience None = auto (``resolve``): "response_acc" and 6 epochs when
    # validation has at least SELECT_MIN_VAL_ROWS rows, else "last" and 0 (the whole schedule): on a
    # few dozen validation rows the "best" epoch is noise.
    select_metric: str | None = None  # "response_acc", "loss" or "last": how the kept epoch is chosen
    early_stop_patience: int | None = None
    # Refit: after validation has chosen the epoch (and calibrated the fallback), train again from the
    # same start on every row, validation included, up to that epoch, and ship that model. None = auto:
    # on below SMALL_DATA_ROWS training rows without --train_all (which would fine-tune the encoder
    # twice): small data gains from every row; big data gained nothing for the extra fit time.
    refit: bool | None = None
    balanced_sampler: bool = False
    max_candidates_per_bucket: int = 256
    # The preference term is on by default: it raised held-out response accuracy at both data sizes.
    pref_weight: float = 0.2
    pref_beta: float = 2.0
    pref_objective: str = "sigmoid"
    pref_margin: float = 1.0
    pref_group_size: int = 4
    pref_group_estimator: str = "mean"
    hard_negative_ratio: float = 0.7
    adaptive_pref_weighting: bool = False
    pref_warmup_epochs: float = 0.0
    # Weight of the neighbour vote in the answers (retrieval/neighbours.py): chat mixes it in, so the
    # fallback thresholds are calibrated with it. 0 answers from the head alone.
    neighbour_weight: float = 0.2
    # The share of right answers the fallback may cost, calibrated on validation (models/calibration.py):
    # half to the similarity gate, half to confidence and margin. More catches more off-topic
    # questions and loses more right answers; `bucketchat eval --oos` shows the trade-off.
    fallback_budget: float = 0.005
    train_all: bool = False
    encoder_lr: float = 2e-5
    lexical_lr: float = 0.01  # lazy Adam rate of the n-gram weights (models/lexical.py)
    seed: int = 42
    device: str = "cpu"
    # Mixed precision of the training forward and backward passes (weights, optimizer state, loss and
    # every evaluation stay float32). auto = bf16 where it is fast (``bf16_is_fast``), else fp32.
    precision: str = "auto"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "--epochs", self.epochs, "use 1 or more"),
            (self.batch_size is None or self.batch_size >= 1, "--batch_size", self.batch_size, "use 1 or more"),
            (self.lr is None or self.lr > 0, "--lr", self.lr, "use a positive learning rate such as 0.001"),
            (self.weight_decay >= 0, "--weight_decay", self.weight_decay, "use 0 or more"),
            (0.0 <= self.label_smoothing < 1.0, "--label_smoothing", self.label_smoothing, "use a value in [0, 1)"),
            (0.0 <= self.val_split < 1.0, "--val_split", self.val_split, "use a fraction in [0, 1), e.g. 0.1"),
            (self.val_max_rows >= 1, "--val_max_rows", self.val_max_rows, "use 1 or more, e.g. 10000"),
            (self.split_mode in SPLIT_MODES, "--split_mode", self.split_mode, f"choose {' or '.join(SPLIT_MODES)}"),
            (self.lr_schedule in SCHEDULES, "--lr_schedule", self.lr_schedule, f"choose one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps >= 0, "--warmup_steps", self.warmup_steps, "use 0 or more"),
            (self.grad_accum_steps >= 1, "--grad_accum_steps", self.grad_accum_steps, "use 1 (no accumulation) or more"),
            (0.0 <= self.ema_decay < 1.0, "--ema_decay", self.ema_decay, "use 0 (off) or a decay below 1 such as 0.999"),
            (
                self.early_stop_patience is None or self.early_stop_patience >= 0,
                "--early_stop_patience",
                self.early_stop_patience,
                "use 0 (off) or more",
            ),
            (self.max_candidates_per_bucket >= 1, "--max_candidates_per_bucket", self.max_candidates_per_bucket, "use 1 or more"),
            (self.pref_weight >= 0, "--pref_weight", self.pref_weight, "use 0 (off) or a positive weight such as 0.2"),
            (self.pref_beta > 0, "--pref_beta", self.pref_beta, "use a positive beta such as 2.5"),
            (self.pref_objective in OBJECTIVES, "--pref_objective", self.pref_objective, f"choose {' or '.join(OBJECTIVES)}"),
            (self.pref_margin >= 0, "--pref_margin", self.pref_margin, "use 0 or more"),
            (self.pref_group_size >= 1, "--pref_group_size", self.pref_group_size, "use 1 or more"),
            (
                self.pref_group_estimator in ESTIMATORS,
                "--pref_group_estimator",
                self.pref_group_estimator,
                f"choose {' or '.join(ESTIMATORS)}",
            ),
            (0.0 <= self.hard_negative_ratio <= 1.0, "--hard_negative_ratio", self.hard_negative_ratio, "use a probability in [0, 1]"),
            (
                self.select_metric is None or self.select_metric in SELECT_METRICS,
                "--select_metric",
                self.select_metric,
                f"choose one of {', '.join(SELECT_METRICS)}",
            ),
            (self.pref_warmup_epochs >= 0, "--pref_warmup_epochs", self.pref_warmup_epochs, "use 0 (no ramp) or more"),
            (
                0.0 <= self.neighbour_weight < 1.0,
                "--neighbour_weight",
                self.neighbour_weight,
                "use a weight in [0, 1): 0 answers from the head alone",
            ),
            (
                0.0 <= self.fallback_budget < 0.5,
                "--fallback_budget",
                self.fallback_budget,
                "use a share in [0, 0.5) such as 0.005; 0 turns the fallback off",
            ),
            (self.encoder_lr > 0, "--encoder_lr", self.encoder_lr, "use a small positive rate such as 2e-5"),
            (self.lexical_lr > 0, "--lexical_lr", self.lexical_lr, "use a positive rate such as 0.01"),
            (self.precision in PRECISIONS, "--precision", self.precision, f"choose one of {', '.join(PRECISIONS)}"),
        ]
        for ok, flag, value, fix in checks:
            if not ok:
                raise ValueError(f"{flag}={value!r} is invalid: {fix}")
        if self.device.startswith("cuda") and not _cuda_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
        if self.device not in ("cpu", "mps") and not self.device.startswith("cuda"):
            raise ValueError(f"--device {self.device!r} is not a torch device; use cpu or cuda")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolve(self, n_train: int, n_val: int) -> TrainConfig:
        """A copy with the automatic settings made concrete for ``n_train`` training and ``n_val``
        validation rows."""
        from dataclasses import replace

        small = n_train < SMALL_DATA_ROWS
        batch = self.batch_size or (64 if small else 512)
        selects = n_val >= SELECT_MIN_VAL_ROWS
        return replace(
            self,
            batch_size=batch,
            lr=self.lr or (1e-3 if batch <= 64 else 2e-3 if batch <= 256 else 3e-3),
            select_metric=self.select_metric or ("response_acc" if selects else "last"),
            early_stop_patience=self.early_stop_patience if self.early_stop_patience is not None else (6 if selects else 0),
            refit=self.refit if self.refit is not None else (small and not self.train_all),
            precision=self.precision if self.precision != "auto" else ("bf16" if bf16_is_fast(self.device) else "fp32"),
        )


SMALL_DATA_ROWS = 8192  # below this many training rows, auto picks small batches (more steps per epoch)


SELECT_MIN_VAL_ROWS = 500  # validation rows needed to pick an epoch (and stop early) by its score


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_settings(train: TrainConfig | dict | None, head: HeadSettings | dict | None) -> tuple[TrainConfig, HeadSettings]:
    """Every training and head setting of a run, defaults filled in and validated once.

    The CLI passes every flag, a deployment or a script only the ones it changes (Prefect has already
    turned its parameters into these dataclasses); both come out the same here, so a run gets the same
    training key and logs the same MLflow params whichever entry point started it.
    """
    train = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
    head = head if isinstance(head, HeadSettings) else HeadSettings(**(head or {}))
    return train, head
