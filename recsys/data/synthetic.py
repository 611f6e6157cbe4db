"""Synthetic long-sequence click logs with a planted, drifting interest signal.

Model of the generator (all draws vectorised, deterministic for a seed):

* every item belongs to one category; item popularity is Zipf-like (weight ``1 / rank**zipf_exponent``
  over a random ranking of the items);
* every user has ``interests_per_user`` favourite categories; each event is, with probability
  ``interest_prob``, an item of a favourite category (chosen uniformly among the favourites, the item
  by popularity within the category), otherwise an item drawn by global popularity;
* interests drift: each user's sequence is cut into ``drift_phases`` equal phases and at the start
  of every phase after the first one favourite is replaced by a new category. The latest behaviours
  therefore predict the next click better than old ones, which rewards recency-aware attention.

Measured on the defaults with the DARE protocol (all splits, AUC of simple scores over the 200-long
history): "target category among the last 10 behaviours" 0.87; count of the target category over
all 200 slots 0.89; the same count weighted by exp(-age / 10..30) 0.91.

Optional planted (category, relative position) structure (``echo_lags``, ``echo_prob``; off by default, so the
default data is unchanged): with probability ``echo_prob`` an event (at step >= lag) repeats the category of
the event ``lag`` steps before it (``lag`` drawn uniformly from ``echo_lags``; the item drawn by popularity
within that category). The category of the behaviour at relative position ``lag`` then carries information
about the next click's category beyond "recent behaviours of the favourite categories", which is what the
mutual-information ground truth of DARE's retrieval analysis (``benchmarks/dare_analysis.py``) ranks: the
pairs (category = target category, relative position in ``echo_lags``) come first. Without it the planted
structure the MI finds is (category = target category, recent positions) through the favourites and drift.

Popularity-sampled negatives rarely share a category with the user's *current* favourites, so
"the target category occurs in the recent history" separates positives from negatives well, but
not perfectly (popularity events and drift blur it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, write_dataset
from recsys.data.protocol import CTRProtocol, build_ctr_samples, filter_behaviors, remap_ids
from recsys.data.schema import LOG_SCHEMA
from recsys.errors import ConfigError

log = logging.getLogger(__name__)

_START_TIME = 1_600_000_000


def _item_catalogue(rng: np.random.Generator, num_items: int, num_categories: int, zipf_exponent: float):
    """(category of each item, popularity weight of each item); every category gets >= 1 item."""
    category = rng.integers(0, num_categories, size=num_items)
    category[rng.permutation(num_items)[:num_categories]] = np.arange(num_categories)
    rank = rng.permutation(num_items) + 1
    return category, rank.astype(np.float64) ** -zipf_exponent


def _favourites(rng: np.random.Generator, num_users: int, num_categories: int, k: int, phases: int) -> np.ndarray:
    """``[users, phases, k]`` favourite categories; each new phase swaps one slot for a fresh category."""
    distinct = k + phases - 1
    if distinct > num_categories:
        raise ConfigError(
            f"synthetic: interests_per_user + drift_phases - 1 = {distinct} exceeds num_categories={num_categories}."
        )
    picks = np.argsort(rng.random((num_users, num_categories)), axis=1)[:, :distinct]
    favs = np.repeat(picks[:, None, :k], phases, axis=1).copy()
    for phase in range(1, phases):
        favs[:, phase:, (phase - 1) % k] = picks[:, k + phase - 1, None]
    return favs


class _PopularitySampler:
    """Draws items by popularity, globally or within given categories, via one sorted cumsum."""

    def __init__(self, category: np.ndarray, weight: np.ndarray, num_categories: int) -> None:
        self.order = np.argsort(category, kind="stable")
        self.cdf = np.cumsum(weight[self.order])
        mass = np.bincount(category, weights=weight, minlength=num_categories)
        self.cat_hi = np.cumsum(mass)
        self.cat_lo = self.cat_hi - mass

    def draw(self, rng: np.random.Generator, cats: np.ndarray | None, size: int) -> np.ndarray:
        """0-based item indices; ``cats=None`` means global popularity."""
        u = rng.random(size)
        x = u * self.cdf[-1] if cats is None else self.cat_lo[cats] + u * (self.cat_hi[cats] - self.cat_lo[cats])
        pos = np.minimum(np.searchsorted(self.cdf, x, side="right"), len(self.cdf) - 1)
        return self.order[pos]


def _plant_echoes(
    rng: np.random.Generator,
    sampler: _PopularitySampler,
    category: np.ndarray,
    item: np.ndarray,
    step: np.ndarray,
    lags: np.ndarray,
    prob: float,
) -> np.ndarray:
    """Events ``[N]`` (users' steps contiguous) -> events where, with probability ``prob``, the event at step
    ``s >= lag`` takes the category of the event at step ``s - lag`` (item by popularity within it). Steps are
    visited in order, so an echo of an echo repeats the already-echoed category."""
    item = item.copy()
    lag = lags[rng.integers(0, len(lags), size=len(item))]
    echo = (rng.random(len(item)) < prob) & (step >= lag)
    for s in range(1, int(step.max()) + 1 if len(step) else 0):
        rows = np.flatnonzero(echo & (step == s))
        if rows.size:
            item[rows] = sampler.draw(rng, category[item[rows - lag[rows]]], rows.size)
    return item


def _timestamps(rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
    """Strictly increasing Unix seconds within each user (gaps of 10 s to 1 h)."""
    starts = _START_TIME + rng.integers(0, 30 * 86_400, size=len(lengths))
    gaps = rng.integers(10, 3_600, size=int(lengths.sum()))
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    total = np.cumsum(gaps)
    before = np.repeat(total[offsets] - gaps[offsets], lengths)
    return np.repeat(starts, lengths) + total - before


def generate_log(
    num_users: int = 1500,
    num_items: int = 5000,
    num_categories: int = 50,
    min_len: int = 220,
    max_len: int = 320,
    interests_per_user: int = 3,
    interest_prob: float = 0.8,
    seed: int = 0,
    drift_phases: int = 6,
    zipf_exponent: float = 1.0,
    echo_lags: tuple[int, ...] | list[int] = (),
    echo_prob: float = 0.0,
) -> pl.DataFrame:
    """A ``LOG_SCHEMA`` click log (behaviour ``pv``), grouped by user, time-ordered; ids start at 1.

    ``echo_lags``/``echo_prob``: the planted (category, relative position) structure of the module docstring
    (``echo_prob = 0`` draws nothing extra: the log is that of the same call without them)."""
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"synthetic: need 1 <= min_len <= max_len, got {min_len}, {max_len}.")
    if min(num_users, num_items, num_categories, interests_per_user, drift_phases) < 1:
        raise ConfigError("synthetic: sizes, interests_per_user and drift_phases must be >= 1.")
    if not 0.0 <= echo_prob <= 1.0 or (echo_prob > 0 and (not echo_lags or min(echo_lags) < 1)):
        raise ConfigError(
            f"synthetic: echo_prob={echo_prob} must be in [0, 1] and, when > 0, echo_lags={list(echo_lags)} "
            "a non-empty list of lags >= 1."
        )
    rng = np.random.default_rng(seed)
    category, weight = _item_catalogue(rng, num_items, num_categories, zipf_exponent)
    favs = _favourites(rng, num_users, num_categories, interests_per_user, drift_phases)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    user = np.repeat(np.arange(num_users), lengths)
    step = np.arange(len(user)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    phase = step * drift_phases // lengths[user]
    fav_cat = favs[user, phase, rng.integers(0, interests_per_user, size=len(user))]
    sampler = _PopularitySampler(category, weight, num_categories)
    item = np.where(
        rng.random(len(user)) < interest_prob,
        sampler.draw(rng, fav_cat, len(user)),
        sampler.draw(rng, None, len(user)),
    )
    if echo_prob > 0:
        item = _plant_echoes(rng, sampler, category, item, step, np.asarray(echo_lags), echo_prob)
    return pl.DataFrame(
        {
            "user": user + 1,
            "item": item + 1,
            "category": category[item] + 1,
            "behavior": np.full(len(user), "pv"),
            "timestamp": _timestamps(rng, lengths),
        },
        schema=dict(LOG_SCHEMA),
    )


def _generator_params(generator: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of :func:`generate_log` overridden by ``generator``; unknown keys raise."""
    defaults = {k: p.default for k, p in inspect.signature(generate_log).parameters.items()}
    given = dict(generator or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"synthetic: unknown generator parameter(s) {unknown}; known: {sorted(defaults)}.")
    params = {**defaults, **given}
    params["echo_lags"] = [int(lag) for lag in params["echo_lags"] or ()]
    if not params["echo_prob"]:  # off: the same parameters (and dataset fingerprint) as before the option
        del params["echo_lags"], params["echo_prob"]
    return params


def prepare_synthetic(
    cache_root: str | Path,
    generator: Mapping[str, Any] | None = None,
    protocol: CTRProtocol | Mapping[str, Any] | None = None,
) -> Path:
    """Generate -> remap -> build samples (DARE protocol by default) -> cache (name ``synthetic``)."""
    protocol = CTRProtocol.coerce(protocol)
    params = _generator_params(generator)
    if params["min_len"] < protocol.min_interactions:
        raise ConfigError(
            f"synthetic: generator min_len={params['min_len']} must be >= protocol.min_interactions="
            f"{protocol.min_interactions}, or some users would be dropped."
        )
    meta_params = {"generator": params, "protocol": protocol.to_dict()}
    fp = fingerprint("synthetic", meta_params, [])
    hit = cached_dataset(Path(cache_root), "synthetic", fp)
    if hit is not None:
        log.info("synthetic: reusing cached dataset %s", hit)
        return hit
    events, vocab, id_maps = remap_ids(filter_behaviors(generate_log(**params), protocol.behaviors))
    splits = build_ctr_samples(events, protocol, vocab=vocab, source="synthetic")
    meta = DatasetMeta.for_splits("synthetic", fp, vocab, protocol.max_len, splits, meta_params)
    return write_dataset(Path(cache_root), meta, splits, id_maps)
