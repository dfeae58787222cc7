"""Latency lookup tables: measured rows per part and token count, their fits, their metadata.

One CSV per device × runtime × threads × batch (``latency_tables/<device>/<runtime>-t<T>-b<B>.csv``)
holds one row per part signature × token count, appended as soon as it is measured so an
interrupted run resumes and loses nothing. A sidecar ``.meta.json`` records the device and
every measuring session (host, governor, affinity, temperatures, toolkit and schema version).

Latency is nearly linear in the token count with a small quadratic term (attention), so a
sparse grid is measured and each signature gets a least-squares fit ``a + b·N + c·N²``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import SpvitError
from .records import append_csv_rows

SCHEMA_VERSION = 1
COLUMNS = (
    "signature", "tokens", "median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "runs", "rounds",
    "runtime", "runtime_version", "threads", "batch", "measured_at",
)  # fmt: skip
_NUMERIC = ("tokens", "median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "runs", "rounds", "threads", "batch")


class LatencyTableError(SpvitError):
    """A table that is malformed, or does not fit what it is used for."""


def table_path(root: str | Path, device: str, runtime: str, threads: int, batch: int) -> Path:
    return Path(root) / device / f"{runtime}-t{threads}-b{batch}.csv"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Fit:
    """``latency_ms(N) = a + b·N + c·N²`` for one signature, from ``points`` measured counts."""

    a: float
    b: float
    c: float
    points: int
    tokens_min: int
    tokens_max: int

    def __call__(self, tokens):
        n = np.asarray(tokens, dtype=float)
        return self.a + self.b * n + self.c * n * n


def fit_curve(tokens, latency_ms) -> Fit:
    n = np.asarray(tokens, dtype=float)
    y = np.asarray(latency_ms, dtype=float)
    distinct = len(np.unique(n))
    if distinct == 0:
        raise ValueError("no points to fit")
    degree = min(2, distinct - 1)
    coeffs = np.polynomial.polynomial.polyfit(n, y, degree) if degree else np.array([y.mean()])
    a, b, c = [*coeffs, 0.0, 0.0][:3]
    return Fit(float(a), float(b), float(c), len(n), int(n.min()), int(n.max()))


class LatencyTable:
    """The rows of one table file (latest measurement per signature and token count)."""

    def __init__(self, rows: pd.DataFrame, path: Path | None = None, meta: dict | None = None) -> None:
        self.path = path
        self.meta = meta if meta is not None else {"schema_version": SCHEMA_VERSION, "sessions": []}
        self._set_rows(rows)

    def _set_rows(self, rows: pd.DataFrame) -> None:
        if len(rows):
            rows = rows.sort_values("measured_at", kind="stable").drop_duplicates(["signature", "tokens"], keep="last")
        self.rows = rows.reset_index(drop=True)
        self._fits: dict[str, Fit] = {}

    # -- files ----------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".meta.json")

    @classmethod
    def open(cls, path: str | Path) -> LatencyTable:
        """Load ``path`` (and its .meta.json) or start an empty table that will be written there."""
        path = Path(path)
        rows = _read_rows(path) if path.exists() else pd.DataFrame(columns=list(COLUMNS))
        meta = None
        meta_path = path.with_suffix(".meta.json")
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as err:
                raise LatencyTableError(f"{meta_path}: not valid JSON ({err})") from None
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise LatencyTableError(
                    f"{meta_path}: schema version {meta.get('schema_version')!r}, this toolkit reads {SCHEMA_VERSION}"
                )
        return cls(rows, path, meta)

    def append(self, rows: list[dict]) -> None:
        """Add measured rows and write them to the file at once (flushed and synced)."""
        if not rows:
            return
        for row in rows:
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise ValueError(f"row for {row.get('signature')} lacks {missing}")
        if self.path is not None:
            append_csv_rows(self.path, COLUMNS, rows)
        frame = pd.DataFrame(rows, columns=list(COLUMNS))
        self._set_rows(pd.concat([self.rows, frame], ignore_index=True) if len(self.rows) else frame)

    def save_meta(self) -> None:
        if self.meta_path is not None:
            self.meta_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.meta, indent=2, sort_keys=False) + "\n")
            tmp.replace(self.meta_path)

    @classmethod
    def merged(cls, paths: list[str | Path]) -> LatencyTable:
        """Rows of several tables of one runtime, threads and batch (the newest row wins)."""
        tables = [cls.open(p) for p in paths]
        for t in tables:
            if not t.path.exists():
                raise LatencyTableError(f"latency table {t.path} does not exist")
        first = tables[0]
        for t in tables[1:]:
            for col in ("runtime", "threads", "batch"):
                a, b = sorted(set(first.rows[col])), sorted(set(t.rows[col]))
                if a != b:
                    raise LatencyTableError(f"cannot merge {first.path} ({col} {a}) with {t.path} ({col} {b})")
        rows = pd.concat([t.rows for t in tables], ignore_index=True)
        meta = dict(first.meta)
        meta["merged_from"] = [str(t.path) for t in tables]
        return cls(rows, first.path, meta)

    def check_setting(self, runtime: str, threads: int, batch: int) -> None:
        """Refuse rows measured with another runtime, thread count or batch size."""
        if not len(self.rows):
            raise LatencyTableError(f"{self.path} has no rows")
        for col, want in (("runtime", runtime), ("threads", threads), ("batch", batch)):
            have = sorted(set(self.rows[col].tolist()))
            if have != [want]:
                raise LatencyTableError(
                    f"{self.path} was measured with {col} {', '.join(map(str, have))}; this device runs {col} {want}"
                )

    def require(self, signatures: dict[str, str], hint: str) -> None:
        """Refuse if a needed signature (value: what it is) has no rows, or too few to fit.

        Parts that always see one token count (what begins with "stem" or "fixed") need one row.
        """
        present = set(self.signatures)
        missing = [f"{sig} ({what})" for sig, what in signatures.items() if sig not in present]
        if missing:
            raise LatencyTableError(f"{self.path} has no rows for {'; '.join(missing)}. {hint}")
        thin = [
            s
            for s, what in signatures.items()
            if not what.startswith(("stem", "fixed")) and self.points(s)["tokens"].nunique() < 2
        ]
        if thin:
            raise LatencyTableError(f"{self.path} has fewer than 2 token counts for {', '.join(thin)}. {hint}")

    # -- queries --------------------------------------------------------------------------------
    @property
    def signatures(self) -> list[str]:
        return sorted(self.rows["signature"].unique()) if len(self.rows) else []

    def has(self, signature: str, tokens: int) -> bool:
        r = self.rows
        return bool(len(r)) and bool(((r["signature"] == signature) & (r["tokens"] == tokens)).any())

    def points(self, signature: str) -> pd.DataFrame:
        r = self.rows[self.rows["signature"] == signature]
        return r.sort_values("tokens")

    def fit(self, signature: str) -> Fit:
        if signature not in self._fits:
            pts = self.points(signature)
            if not len(pts):
                raise LatencyTableError(f"{self.path or 'table'} has no rows for {signature}")
            self._fits[signature] = fit_curve(pts["tokens"], pts["median_ms"])
        return self._fits[signature]

    def plot(self, path: str | Path, title: str = "") -> Path:
        """PNG of latency vs tokens: measured medians (p10–p90 bars) and the fit, per signature."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sigs = self.signatures
        cols = min(3, max(1, len(sigs)))
        rows = (len(sigs) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
        for ax, sig in zip(axes.flat, sigs, strict=False):
            pts = self.points(sig)
            n = pts["tokens"].to_numpy(float)
            med = pts["median_ms"].to_numpy(float)
            err = np.vstack([med - pts["p10_ms"].to_numpy(float), pts["p90_ms"].to_numpy(float) - med])
            ax.errorbar(n, med, yerr=np.clip(err, 0, None), fmt="o", ms=4, capsize=2, label="measured (p10–p90)")
            if len(np.unique(n)) > 1:
                grid = np.linspace(n.min(), n.max(), 100)
                ax.plot(grid, self.fit(sig)(grid), "-", lw=1.2, label="fit a+bN+cN²")
            ax.set_title(sig, fontsize=8)
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(sigs) :]:
            ax.axis("off")
        fig.suptitle(title or str(self.path), fontsize=10)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def write_rescaled(src: str | Path, dest: str | Path, factor: float) -> LatencyTable:
    """A copy of the table at ``src`` (CSV and metadata) as if every row and whole-model point had
    been measured on a day the device ran ``factor`` × as long (factor < 1: a faster day).

    That is a stale table, for testing how a search copes with one (tests, ``benchmarks/drift.py``).
    Each calibration line goes through its scaled points: the scale stays, the offset scales.
    """
    table = LatencyTable.open(src)
    rows = table.rows.copy()
    for col in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms"):
        rows[col] = rows[col] * factor
    meta = json.loads(json.dumps(table.meta))
    for entry in meta.get("calibration", {}).values():
        for point in entry["points"]:
            point["predicted_ms"] *= factor
            point["measured_ms"] *= factor
        entry["offset_ms"] = entry.get("offset_ms", 0.0) * factor
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(dest, index=False)
    copy = LatencyTable(rows, dest, meta)
    copy.save_meta()
    return copy


def _read_rows(path: Path) -> pd.DataFrame:
    try:
        rows = pd.read_csv(path, dtype={"signature": str, "runtime": str, "runtime_version": str, "measured_at": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LatencyTableError(f"{path}: not a readable CSV table ({err})") from None
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise LatencyTableError(f"{path}: missing columns {missing}; a latency table has {list(COLUMNS)}")
    for col in _NUMERIC:
        values = pd.to_numeric(rows[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2  # header is line 1
            raise LatencyTableError(f"{path}, line {line}: column {col} is not a number ({rows[col][bad].iloc[0]!r})")
        rows[col] = values
    for col in ("tokens", "runs", "rounds", "threads", "batch"):
        rows[col] = rows[col].astype(int)
    return rows[list(COLUMNS)]
