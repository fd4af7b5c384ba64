"""Reporting: the before/after comparison table, the JSON report and the training plot."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["format_comparison_table", "plot_training_history", "write_json_report"]

PathLike = Union[str, "os.PathLike[str]"]

# (row key, column header, value formatter); numeric columns are right-aligned.
_COLUMNS: List[tuple] = [
    ("model", "model", str),
    ("accuracy", "accuracy %", lambda v: f"{100.0 * float(v):.2f}"),
    ("kmapp", "normalized FLOPs (kmapp)", lambda v: f"{float(v):.2f}"),
    ("flops_proportion", "FLOPs proportion", lambda v: f"{float(v):.3f}"),
    ("params", "params (M)", lambda v: f"{float(v) / 1e6:.3f}"),
    ("latency_ms", "latency ms", lambda v: f"{float(v):.2f}"),
    ("budget_share", "budget share", str),
]

_LOSS_KEYS = [
    ("task_loss", "task"),
    ("flops_loss", "flops"),
    ("entropy_loss", "entropy"),
    ("bkd_loss", "distillation"),
]


def format_comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Format models side by side as an aligned plain-text table.

    Each row is a mapping with the keys ``model`` (name), ``accuracy`` (a fraction in
    [0, 1], shown as a percentage), ``kmapp`` (normalised FLOPs: FLOPs / (H x W x
    1000), FLOPs = 2 x multiply-adds), ``flops_proportion`` (FLOPs relative to the
    original model), ``params`` (a parameter count, shown in millions), ``latency_ms`` and
    ``budget_share`` (text: the budget and the share of it kept, ``"params 0.498"``).
    An optional ``latency_iqr_ms`` is shown next to the latency as ``± IQR``. Missing or
    None values are shown as ``-``; other keys are ignored.

    Args:
        rows: One mapping per model, e.g. the original and the pruned model.

    Returns:
        The table as a string of lines without a trailing newline.
    """
    header = [title for _, title, _ in _COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            value = row.get(key)
            cell = "-" if value is None else fmt(value)
            if key == "latency_ms" and value is not None and row.get("latency_iqr_ms") is not None:
                cell += f" ± {float(row['latency_iqr_ms']):.2f}"
            cells.append(cell)
        body.append(cells)

    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def render(cells: List[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule] + [render(cells) for cells in body])


def _atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old or the new file.

    The data goes to a temporary file in the same directory, is flushed to disk with
    ``fsync``, and then replaces ``path`` with ``os.replace``. The temporary file is
    removed if anything fails. Missing parent directories are created.

    Args:
        path: Destination file.
        data: File content.

    Returns:
        The destination as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for a normal file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _json_default(obj: Any) -> Any:
    """Convert values the json module does not know (numpy, torch, paths, dataclasses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"value of type {type(obj).__name__} cannot be written to a JSON report")


def write_json_report(path: PathLike, report: Dict[str, Any]) -> Path:
    """Write a report as indented JSON, atomically.

    Numpy values, tensors, paths and dataclasses are converted to plain JSON values.

    Args:
        path: Destination file; missing parent directories are created.
        report: The report.

    Returns:
        The destination as a :class:`Path`.

    Raises:
        TypeError: If the report holds a value that cannot be converted to JSON; the
            destination is then left untouched.
    """
    text = json.dumps(report, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    return _atomic_write_bytes(path, text.encode("utf-8"))


def plot_training_history(
    history: Sequence[Mapping[str, Any]], path: PathLike, target: Optional[float] = None
) -> Path:
    """Plot the course of a pruning run to a PNG file, atomically.

    Three panels share the step axis: the FLOPs proportion (with the target as a dashed
    line), the losses, and the validation accuracy. Loss curves whose key never appears
    are left out; validation accuracy (a fraction in [0, 1], plotted as a percentage) is
    drawn only at the steps where it was recorded.

    Args:
        history: One mapping per logged step with the keys ``step`` and ``proportion``,
            and usually ``task_loss``, ``flops_loss``, ``entropy_loss``, ``bkd_loss`` and
            ``val_accuracy``. Values may be Python numbers or 0-d tensors.
        path: Destination PNG file; missing parent directories are created.
        target: Target FLOPs proportion; if None, the ``target`` key of the last entry
            that has one is used, and no line is drawn if there is none.

    Returns:
        The destination as a :class:`Path`.

    Raises:
        ValueError: If ``history`` is empty or an entry lacks ``step`` or ``proportion``.
    """
    # Figure + Agg canvas directly: no pyplot global state, no backend switching.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("cannot plot an empty training history")
    for i, entry in enumerate(history):
        missing = [key for key in ("step", "proportion") if key not in entry]
        if missing:
            raise ValueError(f"training history entry {i} lacks {', '.join(missing)}: {dict(entry)}")
    if target is None:
        target = next((e["target"] for e in reversed(history) if e.get("target") is not None), None)

    def series(key: str, scale: float = 1.0) -> tuple:
        points = [(float(e["step"]), float(e[key]) * scale) for e in history if e.get(key) is not None]
        return tuple(zip(*points)) if points else ((), ())

    fig = Figure(figsize=(7.0, 9.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_prop, ax_loss, ax_acc = fig.subplots(3, 1, sharex=True)

    ax_prop.plot(*series("proportion"), label="FLOPs proportion")
    if target is not None:
        ax_prop.axhline(float(target), color="tab:red", linestyle="--", label=f"target {float(target):.2f}")
    ax_prop.set_ylabel("FLOPs proportion")
    ax_prop.legend(loc="best")

    for key, label in _LOSS_KEYS:
        steps, values = series(key)
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_ylabel("loss")
    if ax_loss.lines:
        ax_loss.legend(loc="best")

    steps, values = series("val_accuracy", scale=100.0)
    if steps:
        ax_acc.plot(steps, values, marker="o", label="validation")
    else:
        ax_acc.text(0.5, 0.5, "no validation accuracy recorded", ha="center", va="center",
                    transform=ax_acc.transAxes)
    ax_acc.set_ylabel("validation accuracy %")
    ax_acc.set_xlabel("step")

    for ax in (ax_prop, ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return _atomic_write_bytes(path, buffer.getvalue())
