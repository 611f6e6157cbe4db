"""Id-space sizes, importable without polars (models and GPU benchmarks need only this)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vocab:
    """Sizes of the id spaces. Tables get ``num_x + 1`` rows: id 0 is the padding row."""

    num_users: int
    num_items: int
    num_categories: int

    def limit(self, column: str) -> int:
        """Largest valid id for ``column`` (user/item/category or a history column)."""
        return {
            "user": self.num_users,
            "item": self.num_items,
            "hist_item": self.num_items,
            "category": self.num_categories,
            "hist_cat": self.num_categories,
        }[column]
