"""Question data: loaders for parquet / jsonl question files."""

from igpo.data.questions import load_questions

__all__ = ["load_questions"]
