"""Plots and a self-contained HTML report of a mapping."""

from cellvec.report.html import write_report

__all__ = ["write_report"]
