"""``resnet_fused.explain(model, example_input)``: which implementation each fused layer runs
under the current backend setting, and why."""
from __future__ import annotations

import csv
from typing import Optional

import torch
from torch import nn

from . import _select

COLUMNS = ["layer", "op", "input", "weight", "dtype", "training", "residual", "candidates", "choice", "source"]


def _fmt_candidates(row) -> str:
    parts = [f"{b} {ms:.4f} ms" for b, ms in sorted(row["ms"].items(), key=lambda kv: kv[1])]
    parts += [f"{b} failed ({err})" for b, err in row["errors"].items()]
    return "; ".join(parts) if parts else "–"


def _shape(s) -> str:
    return "x".join(str(v) for v in s) if s is not None else "–"


class Explanation:
    """One row per fused-operator call of the explained forward pass: ``layer`` (the conv's
    module name), ``op``, shapes, dtype, mode, the timed ``candidates`` (milliseconds per call,
    or the error of a candidate that failed), the ``choice`` and its ``source``: ``timing``,
    ``memory`` (decided earlier in this process), ``cache`` (the cache file), ``table`` (the
    shipped tuning table), ``rule (...)`` (no timing allowed: the reason in brackets),
    ``forced`` (a backend set by the user), ``only candidate``, or ``device`` (not CUDA)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def table_rows(self) -> list[dict]:
        out = []
        for r in self.rows:
            out.append(dict(layer=r["layer"], op=r["op"], input=_shape(r["input"]), weight=_shape(r["weight"]),
                            dtype=r["dtype"], training="–" if r["training"] is None else str(r["training"]).lower(),
                            residual="–" if r["residual"] is None else str(r["residual"]).lower(),
                            candidates=_fmt_candidates(r), choice=r["choice"], source=r["source"]))
        return out

    def markdown(self) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in self.table_rows()]
        return "\n".join(lines)

    __str__ = markdown

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.table_rows())


def explain(model: nn.Module, example_input: torch.Tensor, *, names: Optional[dict] = None) -> Explanation:
    """Run ``model(example_input)`` once (no gradients) and report, per fused conv layer, the
    candidates, their times, the choice and where it came from.

    Runs in the model's current mode (eval or train) and inside whatever autocast context the
    caller holds; the backend setting in force applies (``auto`` decides as it would in a real
    call, timing undecided signatures if timing is allowed). The model is left as it was: its
    buffers (BatchNorm running statistics, ``num_batches_tracked``) are restored afterwards.
    """
    if _select.RECORDER is not None:
        raise RuntimeError("resnet_fused.explain: already explaining (nested call)")
    conv_names = names if names is not None else {
        id(m): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    rec = _select.Recorder(names=conv_names)
    _select.RECORDER = rec
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        _select.RECORDER = None
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    return Explanation(rec.rows)
