"""Batch scoring over parquet logs: read (polars, streamed) -> map ids -> model -> atomic parquet."""
