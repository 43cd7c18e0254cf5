"""`evaluate`'s result and its exporters: `to_dict` (the CLI's `--json`) and
`to_markdown` (the results tables of the README and `--markdown`)."""

from __future__ import annotations

from dataclasses import dataclass, field

COLUMNS = ["accuracy", "macro-F1", "balanced acc."]


@dataclass
class EvaluationResult:
    """Metrics per representation (pooled over folds), plus curves and scenarios."""

    dataset: str
    label_key: str
    folds: int
    representations: dict[str, dict]
    data_limited: dict[str, dict[str, float]] = field(default_factory=dict)
    panels: dict[str, dict[str, dict]] = field(default_factory=dict)
    leave_out: dict[str, dict[str, dict]] = field(default_factory=dict)
    transfer: dict[str, dict] = field(default_factory=dict)
    broad: dict[str, dict] = field(default_factory=dict)  # each representation, broad level
    two_levels: dict = field(default_factory=dict)  # cellvec's calls at both levels
    broad_label_key: str | None = None
    species_swap: dict = field(default_factory=dict)  # the query in another species' symbols
    recipe: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, *, confusion: bool = False) -> dict:
        def strip(m):
            return m if confusion else {k: v for k, v in m.items() if k != "confusion"}

        out = {
            "dataset": self.dataset,
            "label_key": self.label_key,
            "folds": self.folds,
            "recipe": self.recipe,
            "seconds": round(self.seconds, 1),
            "representations": {k: strip(v) for k, v in self.representations.items()},
        }
        if self.data_limited:
            out["data_limited"] = self.data_limited
        if self.panels:
            out["panels"] = {
                f: {k: strip(v) for k, v in reps.items()} for f, reps in self.panels.items()
            }
        if self.leave_out:
            out["leave_out"] = self.leave_out
        if self.transfer:
            out["transfer"] = {k: strip(v) for k, v in self.transfer.items()}
        if self.broad:
            out["broad_label_key"] = self.broad_label_key
            out["broad"] = {k: strip(v) for k, v in self.broad.items()}
        if self.two_levels:
            out["two_levels"] = self.two_levels
        if self.species_swap:
            sw = self.species_swap
            out["species_swap"] = {
                **{k: v for k, v in sw.items() if k not in ("folds", "transfer")},
                **{
                    part: {k: strip(v) for k, v in sw[part].items()}
                    for part in ("folds", "transfer")
                    if part in sw
                },
            }
        return out

    def to_markdown(self) -> str:
        """One table per part of the result that is there, in the order the README shows."""
        lines = [f"**{self.dataset}** ({self.label_key}, {self.folds}-fold CV)", ""]
        if self.representations:
            lines += _grid("representation", COLUMNS, _scores(self.representations))
        if self.broad:
            lines += [""] + _grid(
                f"broad level ({self.broad_label_key}; a fine label counts as its broad class)",
                COLUMNS,
                _scores(self.broad),
            )
        if self.two_levels:
            lines += _two_levels_md(self.two_levels)
        if self.species_swap:
            lines += _species_swap_md(self.species_swap, self.representations, self.transfer)
        if self.transfer:
            lines += [""] + _grid("transfer (no retraining)", COLUMNS, _scores(self.transfer))
        if self.data_limited:
            lines += _data_limited_md(self.data_limited)
        if self.panels:
            lines += _panels_md(self.panels)
        if self.leave_out:
            lines += _leave_out_md(self.leave_out)
        if self.representations:
            lines += _per_class_md(self.representations)
        return "\n".join(lines)


def _grid(title: str, columns, rows: dict[str, list[str]]) -> list[str]:
    """A markdown table: `title` over the row names, then one column per entry."""
    columns = list(columns)
    n = len(columns) + title.count("|")
    out = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---|" * n]
    return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def _cells(m: dict) -> list[str]:
    return [f"{m[k]:.3f}" for k in ("accuracy", "macro_f1", "balanced_accuracy")]


def _scores(reps: dict[str, dict]) -> dict[str, list[str]]:
    return {n: _cells(m) for n, m in reps.items()}


def _two_levels_md(t: dict) -> list[str]:
    lines = [
        "",
        f"cellvec with the unassigned call (min_confidence {t['min_confidence']:g}, "
        f"min_typicality {t['min_typicality']:g}; atlas with a "
        f"{t['calibration_split']:g} calibration split):",
        "",
    ]
    lines += _grid(
        "level",
        ["macro-F1", "accuracy", "unassigned", "macro-F1 without the call"],
        {
            lvl: [
                f"{t[lvl]['macro_f1']:.3f}",
                f"{t[lvl]['accuracy']:.3f}",
                f"{t[lvl]['unassigned_fraction']:.3f}",
                f"{t[lvl]['macro_f1_without']:.3f}",
            ]
            for lvl in ("fine", "broad")
        },
    )
    return lines + [
        "",
        f"Of the cells whose fine label is unassigned ({t['fine_unassigned']:,}), "
        f"{t['broad_given']:,} get a broad label, {t['broad_right']:,} of them the "
        "right one.",
    ]


def _species_swap_md(sw: dict, representations: dict, transfer: dict) -> list[str]:
    lines = []
    for part in ("folds", "transfer"):
        if part not in sw:
            continue
        kept, total = sw["genes"][part]
        lines += [
            "",
            f"The query renamed to {sw['to']} symbols through {sw['orthologs']} "
            f"(one-to-one orthologs: {kept:,} of {total:,} genes keep a name); cellvec "
            "maps it back with `orthologs=`, the expression peers get the kept genes "
            "under their own names:",
            "",
        ]
        same = representations if part == "folds" else transfer
        lines += _grid(
            f"{'cross-validated' if part == 'folds' else 'transfer'}, query as {sw['to']}",
            COLUMNS + ["macro-F1 in its own species"],
            {
                n: _cells(m) + [f"{same[n]['macro_f1']:.3f}" if n in same else "–"]
                for n, m in sw[part].items()
            },
        )
    return lines


def _data_limited_md(curves: dict[str, dict[str, float]]) -> list[str]:
    sizes = sorted({int(s) for v in curves.values() for s in v})
    return [""] + _grid(
        "macro-F1 with n reference cells per class",
        map(str, sizes),
        {
            n: [f"{curve.get(str(s), float('nan')):.3f}" for s in sizes]
            for n, curve in curves.items()
        },
    )


def _panels_md(panels: dict[str, dict[str, dict]]) -> list[str]:
    names = dict.fromkeys(n for reps in panels.values() for n in reps)
    return [""] + _grid(
        "macro-F1 with a share of the genes in the query",
        panels,
        {
            n: [f"{reps[n]['macro_f1']:.3f}" if n in reps else "–" for reps in panels.values()]
            for n in names
        },
    )


def _leave_out_md(leave_out: dict[str, dict[str, dict]]) -> list[str]:
    broad = any("broad_right" in m for reps in leave_out.values() for m in reps.values())
    rows = {
        f"{sub} | {n}": [
            f"{m['unassigned']:.2f}"
            + (f" ({m['by_typicality']:.2f} / {m['by_mixing']:.2f})" if "by_mixing" in m else ""),
            f"{m['mislabelled']:.2f}",
            f"{m['known_macro_f1']:.3f} / {m['known_macro_f1_without']:.3f}",
        ]
        + ([f"{m['broad_right']:.2f}"] if broad else [])
        for sub, reps in leave_out.items()
        for n, m in reps.items()
    }
    return [""] + _grid(
        "left-out subtype | representation",
        [
            "unassigned (by typicality / by mixing)",
            "mislabelled",
            "known macro-F1 with / without the unassigned call",
        ]
        + (["right broad label"] if broad else []),
        rows,
    )


def _per_class_md(representations: dict[str, dict]) -> list[str]:
    first = next(iter(representations.values()))
    classes = list(first["per_class"])
    return [""] + _grid(
        "per-class F1 (support)",
        [f"{c} ({first['per_class'][c]['support']})" for c in classes],
        {
            n: [f"{m['per_class'][c]['f1']:.2f}" for c in classes]
            for n, m in representations.items()
        },
    )
