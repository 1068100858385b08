"""The settings of every stage, declared once: dataclasses whose fields carry their defaults and ranges.

A field made with `setting(...)` carries a `Spec` (type, range or choices, help). The CLI builds its
options from these fields (`mergekit_sparse.cli.main.spec_option`), the pipeline config is checked
against them (`pipeline.config`), and library code validates with `check_settings`, so a range,
a default or a message cannot differ between the command line and a config file. Stages with
different defaults in the pipeline (e.g. the probe fine-tunes) override defaults, never ranges.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from .errors import OptionError


@dataclass(frozen=True)
class Spec:
    """What values a setting takes: `kind` int, float, str or bool; a range [lo, hi] (either end open,
    either missing) or a tuple of choices; `optional`: None is allowed too."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False
    help: str = ""

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any " + ("integer" if self.kind is int else "number" if self.kind is float else self.kind.__name__)

    def problem(self, value) -> str | None:
        """Why `value` is not valid (one sentence, the same for the CLI and configs), or None."""
        if value is None:
            return None if self.optional else "a value is required"
        if self.choices is not None:
            return None if value in self.choices else f"{value!r} is not {self.range_text()}"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if self.kind is str:
            return None if isinstance(value, str) else f"expected a string, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if self.kind is int and not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        if not math.isfinite(value):
            return f"{value!r} is not a finite number"
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            return f"{float(value) if self.kind is float else value!r} is out of range {self.range_text()}"
        return None


def setting(default, kind: type | None = None, *, help: str = "", **spec) -> object:
    """A dataclass field carrying its Spec (kind inferred from the default when not given)."""
    kind = kind or (type(default) if default is not None else float)
    return field(default=default, metadata={"spec": Spec(kind, help=help, **spec)})


def spec_of(cls, name: str) -> Spec:
    for f in fields(cls):
        if f.name == name:
            return f.metadata["spec"]
    raise RuntimeError(f"{cls.__name__} has no setting {name!r}; this is a bug")


def specs(cls) -> dict[str, Spec]:
    """Every setting of a settings dataclass, in declaration order."""
    return {f.name: f.metadata["spec"] for f in fields(cls) if "spec" in f.metadata}


def defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def check_settings(obj, *, flag=lambda name: "--" + name.replace("_", "-")) -> None:
    """Raise one OptionError listing every setting of `obj` that is out of its range."""
    problems = []
    for name, spec in specs(type(obj)).items():
        why = spec.problem(getattr(obj, name))
        if why:
            problems.append(f"{flag(name)}: {why}")
    if problems:
        raise OptionError("; ".join(problems))


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run (`train`, `retrain` and every training stage of a pipeline)."""

    steps: int = setting(100, lo=1, help="Optimizer steps.")
    lr: float = setting(1e-3, lo=0, lo_open=True, help="Peak learning rate.")
    batch_size: int = setting(8, lo=1, help="Examples per optimizer step (global, across processes).")
    grad_accum: int = setting(1, lo=1, help="Micro-batches per step.")
    warmup: int = setting(0, lo=0, help="Warm-up steps.")
    schedule: str = setting("cosine", choices=("cosine", "linear", "constant"), help="Learning-rate schedule.")
    weight_decay: float = setting(0.0, lo=0, help="Decoupled weight decay (selected entries only).")
    optimizer: str = setting(
        "adamw",
        choices=("adamw", "sgd"),
        help="AdamW, or SGD with heavy-ball momentum (as torch.optim.SGD); both masked.",
    )
    momentum: float = setting(0.9, lo=0, hi=1, hi_open=True, help="SGD momentum (ignored by AdamW).")
    clip: float | None = setting(1.0, float, lo=0, optional=True, help="Clip the gradient norm (0: off).")
    eval_every: int = setting(0, lo=0, help="Held-out loss every N steps (needs --eval-fraction).")
    eval_fraction: float = setting(0.0, lo=0, hi=1, hi_open=True, help="Share of the data held out.")
    max_len: int = setting(128, lo=2, help="Truncate examples to this many tokens.")
    seed: int = setting(0, help="Seed of the data order and held-out split.")
    save_every: int = setting(0, lo=0, help="Resumable snapshot every N steps (0: only at the end).")
    sparse_below: float = setting(0.1, lo=0, hi=1, help="Masks sparser than this keep state per selected entry.")

    def check(self) -> None:
        check_settings(self)
        if self.batch_size % self.grad_accum:
            raise OptionError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}")


@dataclass(frozen=True)
class CoreSettings:
    """Core regions (CPI-FT stage 1)."""

    p: float = setting(
        1.0, lo=0, lo_open=True, hi=100, help="Core size: the top p % of |θ_task − θ_base| (1 means 1 %)."
    )
    scope: str = setting(
        "global", choices=("global", "per-tensor"), help="Select across the whole model, or p % inside each tensor."
    )
    tie_seed: int = setting(0, lo=0, help="Seed of the tie hash: which entries tied at the threshold are taken.")


@dataclass(frozen=True)
class OverlapSettings:
    """Overlap and grouping (CPI-FT stage 2)."""

    tau: float = setting(0.1, lo=0, hi=1, help="Group tasks whose Jaccard overlap S ≥ τ.")
    order: str = setting(
        "random", choices=("random", "input", "least-overlap"), help="Stage order of the groups (see README)."
    )
    seed: int = setting(0, help="Seed of --order random.")


@dataclass(frozen=True)
class FuseSettings:
    """Fusion (CPI-FT stage 3)."""

    omega: float = setting(0.5, lo=0, hi=1, help="For two models: SLERP(θ_b, θ_a, ω).")
    conflict: str = setting(
        "max-delta", choices=("max-delta", "last", "mean"), help="Who wins a position in several cores."
    )


@dataclass(frozen=True)
class GallopSettings:
    """GaLLoP selection (its training is a TrainConfig)."""

    rho: float = setting(1.0, lo=0, lo_open=True, hi=100, help="Select the top ρ % (1 means 1 %).")
    criterion: str = setting(
        "gallop",
        choices=("gallop", "saft", "pafi", "random"),
        help="gallop |g|/(|θ|+ε), saft |g|, pafi lowest |θ|, random (seeded).",
    )
    tie_seed: int = setting(0, lo=0, help="Seed of the tie hash: which entries tied at the threshold are taken.")
    fraction: float = setting(
        0.1, lo=0, lo_open=True, hi=1, help="Share of the data in the seeded gradient subset (d_s)."
    )


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation."""

    limit: int | None = setting(None, int, lo=1, optional=True, help="At most this many examples per task.")
    batch_size: int = setting(16, lo=1, help="Prompts per generation batch.")


@dataclass(frozen=True)
class DataSettings:
    """Sizes of the generated built-in tasks."""

    train: int = setting(400, lo=1, help="Training examples per built-in task.")
    test: int = setting(40, lo=1, help="Test examples per built-in task.")


@dataclass(frozen=True)
class RetrainSettings:
    """Staged retraining's own setting (its training is a TrainConfig)."""

    per_task: int | None = setting(
        None, int, lo=1, optional=True, help="Examples per task per stage (balanced sample)."
    )
