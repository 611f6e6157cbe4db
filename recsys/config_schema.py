"""Types and ranges of the config values a user sets, checked on the resolved config before any data is read.

A bad value is one :class:`~recsys.errors.ConfigError` line naming the key, the value and what is allowed::

    trainer.max_epochs=0: must be an integer >= 1

Rules match dotted keys of the resolved config (a plain nested dict; lists are checked element by element as
``key[i]``) with :func:`fnmatch.fnmatchcase` patterns, first match wins, so exact keys come before patterns.
Keys no rule matches are left to the code that uses them. Plain Python: no Hydra or OmegaConf import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from recsys.errors import ConfigError


@dataclass(frozen=True)
class Number:
    """An ``int`` (``integer=True``) or any real number in ``[low, high]`` (ends left out where ``open_low`` /
    ``open_high``); ``nullable`` also allows null. Booleans and strings are never numbers."""

    integer: bool = True
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.open_low else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.open_high else '<='} {_num(self.high)}"
        else:
            text = kind
        return text + (" or null" if self.nullable else "")


@dataclass(frozen=True)
class Choice:
    """One of ``options``."""

    options: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return f"one of {list(self.options)}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


POSITIVE_INT = Number(low=1)
COUNT = Number(low=0)
POSITIVE = Number(integer=False, low=0, open_low=True)
PROBABILITY = Number(integer=False, low=0, high=1, open_high=True)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")

# backbone (recsys.*) and tower (mtl.*) hyper-parameters, by the name of the key, at any depth
MODEL_RULES: tuple[tuple[str, Number | Choice], ...] = (
    ("*.attention_dim", Number(low=1, nullable=True)),  # null = embedding_dim
    ("*dim", POSITIVE_INT),
    ("*.num_*", POSITIVE_INT),
    ("*.top_k", POSITIVE_INT),
    ("*.routed_topk", POSITIVE_INT),
    ("*.shared_heads", COUNT),
    ("*.window", POSITIVE_INT),
    ("*.kd_span", POSITIVE_INT),
    ("*_hidden[[]*[]]", POSITIVE_INT),
    ("*_hidden", POSITIVE_INT),
    ("*_experts", COUNT),
    ("*dropout", PROBABILITY),
    ("*.init_std", Number(integer=False, low=0, open_low=True, nullable=True)),
    ("*.tau", POSITIVE),
    ("*.lambda_kd", Number(integer=False, low=0)),
    ("*.balance_weight", Number(integer=False, low=0)),
)

TRAIN_RULES: tuple[tuple[str, Number | Choice], ...] = (
    ("seed", Number(low=0, high=2**32 - 1)),
    ("trainer.max_epochs", POSITIVE_INT),
    ("trainer.accelerator", Choice(ACCELERATORS)),
    ("trainer.log_every_n_steps", POSITIVE_INT),
    ("data.batch_size", POSITIVE_INT),
    ("data.eval_batch_size", POSITIVE_INT),
    ("data.num_workers", COUNT),
    ("model.init_std", Number(integer=False, low=0, open_low=True, nullable=True)),
    ("checkpoint.every_n_steps", POSITIVE_INT),
    ("checkpoint.mode", Choice(("min", "max"))),
    *((f"recsys{pattern}", rule) for pattern, rule in MODEL_RULES),  # at any depth: recsys.moh.num_heads
    *((f"mtl{pattern}", rule) for pattern, rule in MODEL_RULES),
)


def leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf; list items as ``key[i]``; ``_target_``-style keys skipped."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not str(key).startswith("_"):
                yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def check(config: Mapping[str, Any], rules: tuple[tuple[str, Number | Choice], ...]) -> None:
    """Raise :class:`ConfigError` for the first leaf whose first matching rule rejects its value."""
    for key, value in leaves(config):
        rule = next((r for pattern, r in rules if fnmatchcase(key, pattern)), None)
        if rule is not None and not rule.accepts(value):
            raise ConfigError(f"{key}={_show(value)}: must be {rule.describe()}")


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def validate_train(config: Mapping[str, Any]) -> None:
    """The training config (resolved, plain dict): value types and ranges, then a GPU for ``trainer=gpu``."""
    check(config, TRAIN_RULES)
    accelerator = (config.get("trainer") or {}).get("accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine; "
                "use trainer=cpu, or trainer=default (GPU when there is one)"
            )
