"""Runs on disk: the run record, the output-folder rule, and the two methods' resumable runners."""

from .files import prepare, read_png, save_png, write_atomic, write_json
from .record import RECORD, RunRecord

__all__ = ["RECORD", "RunRecord", "prepare", "read_png", "save_png", "write_atomic", "write_json"]
