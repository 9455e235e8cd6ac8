"""A small timing harness: named cases, several timed columns, a Markdown table.

Model. A `Case` is one row of the table: a few descriptive labels (problem,
batch size, ...) and several *columns*, callables that do the same work in
different ways (ours vs a peer). `run` times every column of a case in the
same loop:

    warmup   each column is called ``warmup`` times, untimed (compilation,
             caches, thread pools); a column that raises here is marked
             failed and dropped from the case
    repeat   ``repeats`` rounds; in each round every column is called once,
             in an order rotated by one per round, so slow drift and bursts
             of noise on a shared machine hit all columns alike
    median   the reported time of a column is the median of its rounds

A case may also carry ``extras``, a callable run once after the timing
whose dict of numbers (e.g. max error vs a reference) becomes extra columns.

`markdown_table` prints the medians in ms and, for each column, the ratio of
its median to the median of a baseline column (``peer / ours``: above 1
means the baseline is faster). Peers are optional: `optional_import` returns
``None`` and a note when one is missing, the case's column is then ``None``
and shows as "—" with the note under the table.

Framework-free on purpose: ``time.perf_counter``, ``statistics``, ``gc``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

MISSING = "—"


@dataclass
class Case:
    """One row: labels, timed columns (``None`` = skipped peer) and untimed extras."""

    labels: dict[str, str]
    columns: dict[str, Callable[[], Any] | None]
    extras: Callable[[], dict[str, float | str | None]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " | ".join(str(v) for v in self.labels.values())


@dataclass
class Result:
    """Timings (seconds, one per round) per column, failures and extras of one case."""

    case: Case
    times: dict[str, list[float]]
    failures: dict[str, str]
    extras: dict[str, float | str | None]

    def median_ms(self, column: str) -> float | None:
        t = self.times.get(column)
        return 1e3 * statistics.median(t) if t else None

    def spread(self, column: str) -> float | None:
        """Interquartile range over median: how noisy the column's rounds were."""
        t = self.times.get(column)
        if not t or len(t) < 2:
            return None
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
        return (q3 - q1) / statistics.median(t)


def time_case(case: Case, repeats: int, warmup: int, collect: bool = True) -> Result:
    """Warm up, then time the case's columns in interleaved, rotated rounds."""
    failures: dict[str, str] = {}
    live: list[tuple[str, Callable[[], Any]]] = []
    for name, fn in case.columns.items():
        if fn is None:
            continue
        try:
            for _ in range(warmup):
                fn()
        except Exception as err:  # a failing column must not sink the whole run
            failures[name] = f"{type(err).__name__}: {err}"
            continue
        live.append((name, fn))

    times: dict[str, list[float]] = {name: [] for name, _ in live}
    for r in range(repeats):
        k = r % len(live) if live else 0
        for name, fn in live[k:] + live[:k]:
            if collect:
                gc.collect()  # a collection inside a timed call is noise
            start = time.perf_counter()
            try:
                fn()
            except Exception as err:
                failures[name] = f"{type(err).__name__}: {err}"
                continue
            times[name].append(time.perf_counter() - start)

    extras: dict[str, float | str | None] = {}
    if case.extras is not None:
        try:
            extras = dict(case.extras())
        except Exception as err:
            extras = {}
            failures["extras"] = f"{type(err).__name__}: {err}"
    return Result(case, times, failures, extras)


def run(cases: Iterable[Case], repeats: int = 5, warmup: int = 1, collect: bool = True,
        progress: TextIO | None = sys.stderr) -> list[Result]:
    """Time each case in turn; prints one progress line per case to ``progress``."""
    results = []
    cases = list(cases)
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        res = time_case(case, repeats, warmup, collect)
        results.append(res)
        if progress is not None:
            meds = ", ".join(f"{c} {_fmt_ms(res.median_ms(c))}" for c in case.columns)
            print(f"[{i}/{len(cases)}] {case.name}: {meds} ms "
                  f"({time.perf_counter() - start:.1f} s)", file=progress, flush=True)
    return results


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def ratio(result: Result, column: str, baseline: str) -> float | None:
    """median(column) / median(baseline), ``None`` when either is missing."""
    num, den = result.median_ms(column), result.median_ms(baseline)
    if num is None or den is None or den == 0:
        return None
    return num / den


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return MISSING
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_extra(v: float | str | None) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if v != v:  # NaN
        return "nan"
    return f"{v:.1e}"


def markdown_table(results: Sequence[Result], baseline: str | None = None,
                   extra_columns: Sequence[str] | None = None, spread: bool = True) -> str:
    """The results as a Markdown table, with ``column / baseline`` ratio columns.

    Columns: the labels, then each timed column's median in ms, then for each
    non-baseline column its ratio to ``baseline``, then (``spread``) the
    largest interquartile range over median among the timed columns, in %,
    then the extras (in ``extra_columns`` order, or in order of first
    appearance). Failures and skipped columns become footnotes.
    """
    if not results:
        return "(no cases)\n"
    label_keys = _union(r.case.labels for r in results)
    timed = _union(r.case.columns for r in results)
    ratio_cols = [c for c in timed if baseline is not None and c != baseline]
    extras = list(extra_columns) if extra_columns is not None else _union(
        r.extras for r in results)

    header = (label_keys + [f"{c} (ms)" for c in timed]
              + [f"{c} / {baseline}" for c in ratio_cols]
              + (["IQR/med %"] if spread else []) + extras)
    align = ["---"] * len(label_keys) + ["---:"] * (len(header) - len(label_keys))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    notes: dict[str, None] = {}
    for r in results:
        cells = [str(r.case.labels.get(k, "")) for k in label_keys]
        for c in timed:
            if c in r.failures:
                cells.append("failed")
                notes[f"{r.case.name}: {c} failed: {r.failures[c]}"] = None
            else:
                cells.append(_fmt_ms(r.median_ms(c)))
        for c in ratio_cols:
            q = ratio(r, c, baseline)
            cells.append(MISSING if q is None else f"{q:.2f}")
        if spread:
            spreads = [v for v in (r.spread(c) for c in timed) if v is not None]
            cells.append(f"{100 * max(spreads):.0f}" if spreads else MISSING)
        cells += [_fmt_extra(r.extras.get(k)) for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
        for note in r.case.notes:
            notes[note] = None
        if "extras" in r.failures:
            notes[f"{r.case.name}: extras failed: {r.failures['extras']}"] = None
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return out


def _union(dicts: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen.setdefault(k, None)
    return list(seen)


def environment(packages: Sequence[str] = ()) -> str:
    """One line naming the machine and the versions that matter for the timings."""
    parts = [f"python {platform.python_version()}", f"{os.cpu_count()} CPUs",
             platform.machine()]
    for p in packages:
        try:
            parts.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{p} not installed")
    try:
        import torch

        parts.append(f"torch threads {torch.get_num_threads()}")
    except ImportError:
        pass
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Optional peers and the command line
# ---------------------------------------------------------------------------

def optional_import(module: str) -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, note)`` when the peer cannot be imported."""
    try:
        return importlib.import_module(module), None
    except Exception as err:  # ImportError, or a peer broken by our pins
        return None, f"{module} unavailable ({type(err).__name__}: {err}); its column is skipped."


def argument_parser(description: str, repeats: int = 5, warmup: int = 1) -> argparse.ArgumentParser:
    """The options every benchmark shares: --repeats, --warmup, --out, --filter."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed rounds per case; the median is reported (default {repeats})")
    p.add_argument("--warmup", type=int, default=warmup,
                   help=f"untimed calls per column before timing (default {warmup})")
    p.add_argument("--out", default=None,
                   help="also write the Markdown table to this file")
    p.add_argument("--filter", default=None,
                   help="only run cases whose label text contains this substring")
    p.add_argument("--no-gc", action="store_true",
                   help="do not run gc.collect() before each timed call")
    return p


def csv_list(text: str, cast=str, allowed=None) -> list:
    """A comma-separated option as a list (``allowed``: refuse other values)."""
    items = [cast(t.strip()) for t in text.split(",") if t.strip()]
    if allowed is not None and any(i not in allowed for i in items):
        raise SystemExit(f"unknown value in {text!r}; choose from {sorted(allowed)}")
    return items


# ---------------------------------------------------------------------------
# Threads and probes (the batched-LU trap of NOTES.md)
# ---------------------------------------------------------------------------

def with_threads(fn: Callable, threads: int | None) -> Callable:
    """Run ``fn`` under torch.set_num_threads(threads) (None: leave alone)."""
    if threads is None:
        return fn

    def wrapped():
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return wrapped


def probe(argv: list[str], timeout: float) -> tuple[bool, str]:
    """Run ``argv`` (a check that may hang or crash) in a subprocess: (ok, its last
    line of output, or why it failed)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"hung (no answer in {timeout:g} s)"
    lines = (out.stdout + out.stderr).strip().splitlines()
    if out.returncode != 0:
        return False, (lines[-1] if lines else f"rc {out.returncode}")[:200]
    return True, (lines[-1] if lines else "ok")[:200]


def select(cases: Iterable[Case], pattern: str | None) -> list[Case]:
    cases = list(cases)
    if not pattern:
        return cases
    return [c for c in cases if pattern.lower() in c.name.lower()]


def emit(text: str, out: str | None) -> None:
    """Print ``text``; also write it to ``out`` when given."""
    print(text)
    if out:
        directory = os.path.dirname(os.path.abspath(out))
        os.makedirs(directory, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
