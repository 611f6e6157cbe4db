"""Third-party log lines that say nothing to a person running the project, silenced where they come from.

* FBGEMM logs ``Successfully loaded: '<library>.so'`` on the root logger once per kernel library (14 lines);
* Lightning prints a ``💡 Tip: ... litlogger ...`` advert when no LitLogger is configured;
* torch.fx warns ``is_fx_tracing will return true for both ...`` when TorchRec asks whether it is traced;
* torch.utils._pytree's ``isinstance(treespec, LeafSpec)`` FutureWarning, raised inside Lightning/TorchRec.

The ``Trainer(limit_*=1.0) was configured so ...`` lines are not filtered: ``configs/trainer/default.yaml`` leaves
those keys null (Lightning's default), so Lightning has nothing to announce.
"""

from __future__ import annotations

import logging
import warnings

#: message prefixes dropped from the loggers below
NOISE = ("Successfully loaded: '", "💡 Tip:")
#: loggers that emit them: the root logger (FBGEMM calls logging.info) and Lightning's rank-zero loggers
NOISY_LOGGERS = (
    "",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class DropNoise(logging.Filter):
    """Drops records whose message starts with one of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_third_party_logs() -> None:
    """Install the filters (idempotent); the pipelines call it before a job runs."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
