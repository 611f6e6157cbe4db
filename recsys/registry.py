"""The model parts a config or a model bundle may name: the package's own backbones, task towers and builders.

A model bundle's ``config.yaml`` is data from outside (a colleague's folder, a shared MLflow server), so
building a model from it never imports anything by name: each ``_target_`` is looked up in the tables below,
by the exact string the configs use (``recsys.models.sasrec.SASRec``), and called with the section's plain
values (str, int, float, bool, null, lists and mappings of those). Training builds its backbone and tower the
same way (:func:`factory`), so whatever trains can be rebuilt from its bundle.

A new model = its module + its ``configs/recsys|mtl/<name>.yaml`` + one entry in :data:`BACKBONES` or
:data:`TOWERS` (``tests/test_untrusted_inputs.py`` checks every config there is registered).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mtl.esmm import ESMMTower
from mtl.mmoe import MMoETower
from mtl.ple import PLETower
from mtl.shared_bottom import SharedBottomTower
from mtl.single import SingleTower
from mtl.switch import SwitchTower
from mtl.taskexpert import TaskExpertTower
from recsys.errors import ConfigError, UserError
from recsys.models.fields import FieldsBackbone
from recsys.models.mqsa_ted import MQSATED
from recsys.models.ranking import build_ranking_model
from recsys.models.sasrec import SASRec
from recsys.models.sequential import build_sequential_model
from recsys.models.target_attention import TargetAttentionBackbone


def target_name(obj: Callable[..., Any]) -> str:
    """``module.qualname``: the ``_target_`` string a config uses for ``obj``."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _by_name(*objects: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    return {target_name(obj): obj for obj in objects}


#: ``recsys`` section ``_target_`` -> backbone class (``configs/recsys/*.yaml``)
BACKBONES = _by_name(TargetAttentionBackbone, FieldsBackbone, SASRec, MQSATED)
#: ``mtl`` section ``_target_`` -> task tower class (``configs/mtl/*.yaml``)
TOWERS = _by_name(SingleTower, SharedBottomTower, MMoETower, PLETower, ESMMTower, SwitchTower, TaskExpertTower)
#: ``bundle.json`` ``model_builder`` -> ``(datamodule-like, backbone factory, tower factory, init_std) -> nn.Module``
MODEL_BUILDERS = _by_name(build_ranking_model, build_sequential_model)
#: config section -> (what it holds, its table)
SECTIONS: dict[str, tuple[str, dict[str, Callable[..., Any]]]] = {
    "recsys": ("backbones", BACKBONES),
    "mtl": ("task towers", TOWERS),
}
_ALLOWED_KEYS = ("_target_", "_partial_")
_PLAIN = (str, int, float, bool, type(None))


def _fail(error: type[UserError], where: str, message: str) -> UserError:
    return error(f"{where}: {message}")


def _check_plain(value: Any, key: str, where: str, error: type[UserError]) -> None:
    """Plain values only, and no nested ``_target_`` (only the section itself is built)."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]", where, error)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise _fail(error, where, f"{key}: mapping key {k!r} is not a string")
            if k.startswith("_") and k.endswith("_"):
                raise _fail(
                    error,
                    where,
                    f"{key}.{k}: nested Hydra keys are not allowed (only {key.split('.')[0]}."
                    f"_target_ is built; the values below it must be plain)",
                )
            _check_plain(item, f"{key}.{k}", where, error)
        return
    raise _fail(
        error, where, f"{key} holds a {type(value).__name__}; allowed: str, int, float, bool, null, lists, mappings"
    )


def _parameters(fn: Callable[..., Any]) -> set[str] | None:
    """Keyword names ``fn`` accepts, following ``**kwargs`` up a class's ``__init__`` chain; None = any."""
    names: set[str] = set()
    chain = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    for init in chain:
        if init is object.__init__:
            return names
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def factory(
    spec: Any, section: str, where: str = "config", error: type[UserError] = ConfigError
) -> functools.partial[Any]:
    """A ``recsys`` or ``mtl`` config section -> ``functools.partial(registered callable, **its values)``.

    ``spec``: a plain mapping (``OmegaConf.to_container(..., resolve=True)``) with ``_target_`` (a key of the
    section's table), optionally ``_partial_: true``, and keyword values; anything else raises ``error``
    naming ``where`` (the file), the key and what is allowed. Nothing is imported or called here.
    """
    what, table = SECTIONS[section]
    if not isinstance(spec, Mapping):
        raise _fail(error, where, f"{section} must be a mapping with a _target_, got {type(spec).__name__}")
    target = spec.get("_target_")
    if not isinstance(target, str) or target not in table:
        raise _fail(error, where, f"{section}._target_={target!r} is not one of the package's {what}: {sorted(table)}")
    if spec.get("_partial_", True) is not True:
        raise _fail(error, where, f"{section}._partial_={spec['_partial_']!r}: must be true (or absent)")
    fn = table[target]
    accepted = _parameters(fn)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key in _ALLOWED_KEYS:
            continue
        if not isinstance(key, str):
            raise _fail(error, where, f"{section}: key {key!r} is not a string")
        if key.startswith("_") and key.endswith("_"):
            raise _fail(error, where, f"{section}.{key}: not allowed; the only special keys are {list(_ALLOWED_KEYS)}")
        if accepted is not None and key not in accepted:
            raise _fail(error, where, f"{section}.{key}: {target} takes no such parameter; it takes {sorted(accepted)}")
        _check_plain(value, f"{section}.{key}", where, error)
        kwargs[key] = value
    return functools.partial(fn, **kwargs)


def model_builder(name: Any, where: str = "bundle.json", error: type[UserError] = ConfigError) -> Callable[..., Any]:
    """The registered model builder called ``name`` (``bundle.json``'s ``model_builder``)."""
    if not isinstance(name, str) or name not in MODEL_BUILDERS:
        raise _fail(
            error, where, f"model_builder={name!r} is not one of the package's builders: {sorted(MODEL_BUILDERS)}"
        )
    return MODEL_BUILDERS[name]
