"""Collected figures and how they are shown: a text table, JSON, a PNG chart.

A :class:`Row` is one figure of one workload (say "1 KiB GET c10, req/s")
measured on several paths: through the tunnel, directly (no tunnel), through
``ssh -R``... Each path keeps every run's value; the table shows the median
and the min-max with the run count.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["Row", "Report", "PATHS"]

#: Path columns, in table order ("tunnel" is the Python server + Python client,
#: "go" the Go reference's server + client, both started in the same run).
PATHS = ("tunnel", "go", "go-srv+py-cli", "py-srv+go-cli", "worker", "gunicorn", "forward", "ssh-R", "direct")

#: Ratio columns (medians, first / second), shown when a table has both paths.
RATIOS = (("tunnel", "go"), ("worker", "go"), ("gunicorn", "go"), ("forward", "ssh-R"), ("tunnel", "direct"))


@dataclass
class Row:
    """One figure measured on one or more paths."""

    workload: str
    metric: str
    unit: str
    reference: str = ""  # the target for this figure, as text (shown in the "target" column)
    higher_is_better: bool = True
    values: Dict[str, List[float]] = field(default_factory=dict)
    note: str = ""

    def add(self, path: str, value: float) -> None:
        self.values.setdefault(path, []).append(value)

    def median(self, path: str) -> Optional[float]:
        values = self.values.get(path)
        return statistics.median(values) if values else None

    def cell(self, path: str) -> str:
        values = self.values.get(path)
        if not values:
            return "-"
        med = statistics.median(values)
        if len(values) == 1:
            return f"{_fmt(med)} (n=1)"
        return f"{_fmt(med)} [{_fmt(min(values))}-{_fmt(max(values))}] (n={len(values)})"


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


class Report:
    """All rows of a run plus notes (tools used, skipped parts)."""

    def __init__(self) -> None:
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.meta: Dict[str, object] = {}

    def row(self, workload: str, metric: str, unit: str, reference: str = "",
            higher_is_better: bool = True) -> Row:
        """The row for ``workload``/``metric``, created on first use."""
        for existing in self.rows:
            if existing.workload == workload and existing.metric == metric:
                return existing
        created = Row(workload, metric, unit, reference, higher_is_better)
        self.rows.append(created)
        return created

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def paths(self, rows: Optional[Sequence[Row]] = None) -> List[str]:
        used = {path for row in (self.rows if rows is None else rows) for path in row.values}
        return [path for path in PATHS if path in used] + sorted(used - set(PATHS))

    def blocks(self) -> List[List[Row]]:
        """The rows in groups that share one header: a workload at all its
        concurrencies ("1 KiB GET c1", "... c10"...) is one group."""
        groups: Dict[str, List[Row]] = {}
        for row in self.rows:
            groups.setdefault(re.sub(r" c\d+$", "", row.workload), []).append(row)
        return list(groups.values())

    def _lines(self, rows: Sequence[Row]) -> List[List[str]]:
        """Header and cells of one block of rows."""
        paths = self.paths(rows)
        ratios = [pair for pair in RATIOS if pair[0] in paths and pair[1] in paths]
        header = ["workload", "metric", *paths, *(f"{a}/{b}" for a, b in ratios), "target"]
        lines = [header]
        for row in rows:
            cells = [row.workload, f"{row.metric} ({row.unit})"]
            cells += [row.cell(path) for path in paths]
            for first, second in ratios:
                top, bottom = row.median(first), row.median(second)
                cells.append(f"{top / bottom:.2f}" if top is not None and bottom else "-")
            cells.append(row.reference or "-")
            lines.append(cells)
        return lines

    def table(self) -> str:
        """The figures as plain-text tables, one per workload (medians,
        [min-max], run counts, ratios of medians), then the notes."""
        out: List[str] = []
        for rows in self.blocks():
            lines = self._lines(rows)
            widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
            if out:
                out.append("")
            for number, cells in enumerate(lines):
                out.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip())
                if number == 0:
                    out.append("  ".join("-" * width for width in widths))
        for note in self.notes:
            out.append(f"note: {note}")
        return "\n".join(out)

    def rst_table(self) -> str:
        """The figures as reStructuredText list-tables (for the docs)."""
        out: List[str] = []
        for rows in self.blocks():
            lines = self._lines(rows)
            out += [".. list-table::", "   :header-rows: 1", ""]
            out += ["   * - " + "\n     - ".join(cells) for cells in lines]
            out.append("")
        return "\n".join(out).rstrip()

    def save(self, json_path: Optional[str], rst_path: Optional[str]) -> None:
        """Write the report as JSON and as an RST table, to whichever paths are given."""
        if json_path:
            with open(json_path, "w") as handle:
                handle.write(self.to_json())
        if rst_path:
            with open(rst_path, "w") as handle:
                handle.write(self.rst_table() + "\n")

    def to_json(self) -> str:
        return json.dumps(
            {
                "meta": self.meta,
                "notes": self.notes,
                "rows": [
                    {
                        "workload": row.workload,
                        "metric": row.metric,
                        "unit": row.unit,
                        "reference": row.reference,
                        "values": row.values,
                        "medians": {path: row.median(path) for path in row.values},
                    }
                    for row in self.rows
                ],
            },
            indent=2,
        )

    def chart(self, path: str, rows: Optional[Sequence[Row]] = None) -> None:
        """Write a PNG bar chart of the medians (with min-max error bars),
        one panel per row that has numbers. Needs matplotlib (the ``bench``
        extra); raises ``ImportError`` without it."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = [row for row in (rows or self.rows) if row.values]
        if not chosen:
            raise ValueError("nothing to chart")
        columns = 3
        lines = (len(chosen) + columns - 1) // columns
        figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.6 * lines), squeeze=False)
        colours = {"tunnel": "#1f77b4", "direct": "#7f7f7f", "forward": "#2ca02c", "ssh-R": "#d62728",
                   "go": "#ff7f0e", "gunicorn": "#8c564b"}
        for index, row in enumerate(chosen):
            axis = axes[index // columns][index % columns]
            names = [path for path in self.paths() if row.values.get(path)]
            medians = [row.median(name) or 0.0 for name in names]
            lows = [m - min(row.values[n]) for m, n in zip(medians, names)]
            highs = [max(row.values[n]) - m for m, n in zip(medians, names)]
            axis.bar(names, medians, yerr=[lows, highs], capsize=3,
                     color=[colours.get(name, "#9467bd") for name in names])
            axis.set_title(f"{row.workload}\n{row.metric}", fontsize=8)
            axis.set_ylabel(row.unit, fontsize=8)
            axis.tick_params(labelsize=7)
        for index in range(len(chosen), lines * columns):
            axes[index // columns][index % columns].axis("off")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
