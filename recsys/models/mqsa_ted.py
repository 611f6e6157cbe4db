"""MQSA-TED: multi-query self-attention with transition-aware embedding distillation
(Zhu et al., WSDM 2024; the method as this package implements it: docs/seqrec.md).

Two full encoders read the same inputs ``x``: a short-query branch (query = the item itself, exactly
SASRec) and a long-query branch whose query at position ``t`` is the causal mean of the last ``window``
(L) inputs. Scores ``r_t(i) = α ⟨h_t^short, e_i⟩ + (1 - α) ⟨h_t^long, e_i⟩``, computed as one dot product
with the mixed state. TED (``lambda_kd > 0``) distils the item-transition graph into the item table;
its loss lives in ``recsys/losses/sequential.py``. ``alpha = 1, lambda_kd = 0`` is exactly SASRec.
"""

from __future__ import annotations

from typing import Any

from recsys.errors import ConfigError
from recsys.models.sasrec import SASRec


class MQSATED(SASRec):
    """:class:`SASRec` plus a long-query branch.

    Args:
        window: the long query's length L (>= 1; official default 3).
        alpha: weight of the short branch, ``0 <= α <= 1`` (official 0.5).
        lambda_kd: TED weight (official 0.1); see :class:`SASRec` for the rest.
    """

    def __init__(self, *args: Any, window: int = 3, alpha: float = 0.5, lambda_kd: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, lambda_kd=lambda_kd, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha, self.window = alpha, window
        self.encoders["long"] = self.make_encoder(window=window)

    def branch_weights(self) -> dict[str, float]:
        return {"short": self.alpha, "long": 1.0 - self.alpha}
