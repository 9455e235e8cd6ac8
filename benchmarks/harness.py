"""The benchmarks' shared harness: timing, tables, options, threads, peers, profiles.

A `Case` is one row: labels and timed *columns*, callables doing the same work
in different ways (ours vs a peer). `run` warms each column up (a column that
raises there is marked failed), then times ``repeats`` rounds in which every
column runs once, in an order rotated by one per round, so drift and bursts of
noise on a shared machine hit all columns alike; a column's time is the median
of its rounds. ``extras`` (run once, untimed) add columns such as errors
against a reference. Every ratio is ``peer / ours``: above 1, ours is faster.
A missing peer's column is ``None`` and shows "—" with a note.

Importing this module puts ``tests/`` on sys.path, so the benchmarks use the
tests' reference solvers (``references``) rather than copies.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import importlib.metadata
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")  # ignored by git
sys.path.insert(0, os.path.join(ROOT, "tests"))
MISSING = "—"
# cvxpylayers' tight column: Clarabel through diffcp at tolerances well below our own.
CVXPYL_CLARABEL_TIGHT = {"solve_method": "Clarabel", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10,
                         "tol_feas": 1e-10, "tol_ktratio": 1e-8}
FAST = ("ours", "torch")  # the columns timed apart from slow peers (`Case.peer_rounds`)
LU_TRAP_SIZE = 150  # torch's batched CPU LU with 2 threads fails from about this size


@dataclass
class Case:
    """One row: labels, timed columns (``None`` = skipped peer) and untimed extras.
    With ``peer_rounds`` = (repeats, warmup), the columns other than `FAST` are slow
    peers, timed after the fast ones in those rounds of their own."""

    labels: dict[str, str]
    columns: dict[str, Callable[[], Any] | None]
    extras: Callable[[], dict[str, float | str | None]] | None = None
    notes: list[str] = field(default_factory=list)
    peer_rounds: tuple[int, int] | None = None

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


def _attempt(fn: Callable[[], Any], failures: dict, name: str) -> bool:
    """Call ``fn``; on an error record it under ``name`` and return False (one failing
    column must not sink the whole run)."""
    try:
        fn()
        return True
    except Exception as err:
        failures[name] = f"{type(err).__name__}: {err}"
        return False


def _time_columns(columns: dict, repeats: int, warmup: int, collect: bool,
                  failures: dict) -> dict[str, list[float]]:
    """Warm up, then time the columns in interleaved, rotated rounds."""
    live = [(name, fn) for name, fn in columns.items() if fn is not None and _attempt(
        lambda f=fn: [f() for _ in range(warmup)], failures, name)]
    times: dict[str, list[float]] = {name: [] for name, _ in live}
    for r in range(repeats):
        k = r % len(live) if live else 0
        for name, fn in live[k:] + live[:k]:
            if collect:
                gc.collect()  # a collection inside a timed call is noise
            start = time.perf_counter()
            if _attempt(fn, failures, name):
                times[name].append(time.perf_counter() - start)
    return times


def time_case(case: Case, repeats: int, warmup: int, collect: bool = True) -> Result:
    """The case's columns timed together, or, with ``peer_rounds``, the fast ones first
    without a gc.collect() before each call (a full collection over CVXPY's objects
    leaves the caches cold: it made a 60 µs torch.softmax read 500 µs), one collection
    before them, then the peers in their own rounds."""
    failures: dict[str, str] = {}
    if case.peer_rounds is None:
        times = _time_columns(case.columns, repeats, warmup, collect, failures)
    else:
        gc.collect()
        fast = {k: f for k, f in case.columns.items() if k in FAST}
        times = _time_columns(fast, repeats, warmup, False, failures)
        times |= _time_columns({k: f for k, f in case.columns.items() if k not in FAST},
                               *case.peer_rounds, collect, failures)
    extras: dict = {}
    if case.extras is not None:
        _attempt(lambda: extras.update(case.extras()), failures, "extras")
    return Result(case, times, failures, extras)


def run(cases: Iterable[Case], repeats: int = 5, warmup: int = 1, collect: bool = True,
        progress: TextIO | None = sys.stderr) -> list[Result]:
    """Time each case in turn (one progress line each)."""
    results, cases = [], list(cases)
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        results.append(time_case(case, repeats, warmup, collect))
        if progress is not None:
            meds = ", ".join(f"{c} {fmt_ms(results[-1].median_ms(c))}" for c in case.columns)
            print(f"[{i}/{len(cases)}] {case.name}: {meds} ms "
                  f"({time.perf_counter() - start:.1f} s)", file=progress, flush=True)
    return results


def ratio(result: Result, column: str, baseline: str) -> float | None:
    """median(column) / median(baseline), ``None`` when either is missing."""
    num, den = result.median_ms(column), result.median_ms(baseline)
    return None if num is None or den is None or den == 0 else num / den


def fmt_ms(v: float | None) -> str:
    return MISSING if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_extra(v: float | str | None) -> str:
    return "" if v is None else v if isinstance(v, str) else "nan" if v != v else f"{v:.1e}"


def markdown_table(results: Sequence[Result], baseline: str | None = None,
                   extra_columns: Sequence[str] | None = None, spread: bool = True) -> str:
    """The results as a Markdown table: labels, medians (ms), ``column / baseline``
    ratios, the noisiest column's IQR/median (%), extras; failures as footnotes."""
    if not results:
        return "(no cases)\n"
    label_keys = _union(r.case.labels for r in results)
    timed = _union(r.case.columns for r in results)
    ratio_cols = [c for c in timed if baseline is not None and c != baseline]
    extras = list(extra_columns) if extra_columns is not None else _union(
        r.extras for r in results)
    header = (label_keys + [f"{c} (ms)" for c in timed] + [f"{c} / {baseline}" for c in ratio_cols]
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
                cells.append(fmt_ms(r.median_ms(c)))
        for c in ratio_cols:
            q = ratio(r, c, baseline)
            cells.append(MISSING if q is None else f"{q:.2f}")
        if spread:
            worst = max((x for x in map(r.spread, r.times) if x is not None), default=None)
            cells.append(MISSING if worst is None else f"{100 * worst:.0f}")
        cells += [_fmt_extra(r.extras.get(k)) for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
        notes.update(dict.fromkeys(r.case.notes))
        if "extras" in r.failures:
            notes[f"{r.case.name}: extras failed: {r.failures['extras']}"] = None
    out = "\n".join(lines) + "\n"
    return out + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def ratio_summary(results: Sequence[Result], peer: str, group: str | None = None,
                  slower_below: float = 1.0) -> list[str]:
    """Per group (a label, or all rows): the geometric mean of ``peer / ours`` and the
    worst row; then the rows below ``slower_below`` (ours slower), worst first."""
    groups: dict[str, list[tuple[float, Result]]] = {}
    for r in results:
        q = ratio(r, peer, "ours")
        if q is not None:
            key = f"{group} = {r.case.labels[group]}" if group else "all rows"
            groups.setdefault(key, []).append((q, r))
    lines, slow = [], []
    for g, items in groups.items():
        (q_min, worst), mean = min(items, key=lambda t: t[0]), statistics.geometric_mean(
            [q for q, _ in items])
        lines.append(f"- {g}: geometric mean of {peer} / ours = {mean:.2f} over {len(items)} "
                     f"rows; worst {q_min:.2f} ({worst.case.name})")
        slow += [(q, r) for q, r in items if q < slower_below]
    slow.sort(key=lambda t: t[0])
    lines.append(f"- rows with {peer} / ours below {slower_below:g}: "
                 + ("; ".join(f"{r.case.name} ({q:.2f})" for q, r in slow) if slow else "none"))
    return lines


def _union(dicts: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        seen.update(dict.fromkeys(d))
    return list(seen)


def environment(packages: Sequence[str] = ()) -> str:
    """One line naming the machine, the versions that matter and the load average."""
    parts = [f"python {platform.python_version()}", f"{os.cpu_count()} CPUs", platform.machine()]
    for p in packages:
        try:
            parts.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{p} not installed")
    with contextlib.suppress(ImportError):
        import torch

        parts.append(f"torch threads {torch.get_num_threads()}")
    with contextlib.suppress(OSError):
        parts.append("load average (1, 5, 15 min) " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return ", ".join(parts)


def header(title: str, args, packages: Sequence[str], what: str = "") -> str:
    """The report's title, environment and timing convention."""
    return (f"# {title}\n\n{environment(packages)}\n"
            f"medians of {args.repeats} interleaved rounds after {args.warmup} warmup call(s); "
            f"every ratio is peer / ours, above 1: ours is faster{what}\n\n")


def argument_parser(description: str, repeats: int | None = 5, warmup: int | None = 1,
                    threads: int | None = None) -> argparse.ArgumentParser:
    """The options every benchmark shares; ``repeats`` / ``warmup`` None: a benchmark
    that does not time rounds of cases (no --repeats, --warmup, --filter, --no-gc)."""
    p = argparse.ArgumentParser(description=description)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help=f"timed rounds per row; the median is reported (default {repeats})")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup,
                       help=f"untimed calls per column before timing (default {warmup})")
        p.add_argument("--filter", default=None,
                       help="only rows whose labels, joined by ' | ', contain this text")
        p.add_argument("--no-gc", action="store_true",
                       help="do not run gc.collect() before each timed call")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch (and BLAS) threads for the whole run (default: "
                        + ("torch's own)" if threads is None else f"{threads})"))
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--out", default=None,
                   help="where the report goes (default benchmarks/results/<script>.md)")
    return p


def setup(threads: int | None) -> None:
    """Thread counts for torch and BLAS; silence the solvers' warnings (statuses are
    reported, and a warning printed inside a timed call is noise)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            threadpool_limits(threads)
    warnings.simplefilter("ignore")


def csv_list(text: str, cast=str, allowed=None) -> list:
    """A comma-separated option as a list (``allowed``: refuse other values)."""
    items = [cast(t.strip()) for t in text.split(",") if t.strip()]
    if allowed is not None and any(i not in allowed for i in items):
        raise SystemExit(f"unknown value in {text!r}; choose from {sorted(allowed)}")
    return items


def select(cases: Iterable[Case], pattern: str | None) -> list[Case]:
    cases = list(cases)
    return [c for c in cases if pattern.lower() in c.name.lower()] if pattern else cases


def emit(text: str, out: str | None, script: str | None = None) -> None:
    """Print ``text`` and write it to ``out`` (default benchmarks/results/<script>.md,
    ``script`` by default the running one)."""
    print(text)
    name = os.path.splitext(os.path.basename(script or sys.argv[0]))[0]
    path = out or os.path.join(RESULTS, name + ".md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"(written to {os.path.relpath(path)})", file=sys.stderr)


def fwd_bwd(solve: Callable[[], Any], inputs: Sequence, weights: Sequence,
            pass_: str = "fwd+bwd") -> Callable[[], Any]:
    """A column: ``solve()`` (``fwd``; ``infer``: under no_grad), or ``fwd+bwd``:
    then ``autograd.grad`` of Σ_k sum(w_k · out_k) in ``inputs``: (outputs, gradients)."""
    import torch

    def call():
        if pass_ != "fwd+bwd":
            with torch.set_grad_enabled(pass_ == "fwd"):
                return solve()
        out = solve()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        loss = sum((w * o).sum() for w, o in zip(weights, outs))
        return outs, torch.autograd.grad(loss, list(inputs))

    return call


def layer_call(layer, params: Sequence, weights: Sequence, solver_args: dict | None = None,
               pass_: str = "fwd+bwd") -> Callable[[], Any]:
    """`fwd_bwd` of a CvxpyLayer (ours or cvxpylayers') called on ``params``, gradients
    in those that require grad."""
    kw = {} if solver_args is None else {"solver_args": dict(solver_args)}
    return fwd_bwd(lambda: layer(*params, **kw), [p for p in params if p.requires_grad],
                   weights, pass_)


def optional_import(module: str) -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, note)`` when the peer cannot be imported."""
    try:
        return importlib.import_module(module), None
    except Exception as err:  # ImportError, or a peer broken by our pins
        return None, f"{module} unavailable ({type(err).__name__}: {err}); its column is skipped."


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


def run_child(script: str, spec: dict, timeout: float | None = None):
    """Run ``script --child <spec as JSON>`` in a fresh process: (ok, the JSON its last
    line of output holds, or why it failed)."""
    try:
        out = subprocess.run([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"hung (no answer in {timeout:g} s)"
    lines = (out.stdout + out.stderr).strip().splitlines() or [f"rc {out.returncode}"]
    if out.returncode != 0:
        return False, lines[-1][:200]
    return True, json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which starts afresh at exec;
    ru_maxrss would carry over the forking parent's peak."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def qpth_threads(name: str, size: int) -> tuple[int | None, str]:
    """Thread count and note for a qpth column that factors ``size``×``size`` systems:
    torch's batched LU on CPU with 2 threads gives wrong pivots or hangs from about
    150×150 (shared/NOTES.md), so such a column runs on one thread."""
    import torch

    if size < LU_TRAP_SIZE or torch.get_num_threads() == 1:
        return None, ""
    return 1, (f"{name}: qpth runs with torch.set_num_threads(1): torch's batched CPU LU "
               f"is unreliable with more threads from {LU_TRAP_SIZE}×{LU_TRAP_SIZE}.")


# Where profiled time goes, by the component that spent it (own time).
COMPONENTS = (
    ("declarative (ours)", ("/declarative/", "/canon/", "/backends/")),
    ("cvxpylayers", ("cvxpylayers",)), ("diffcp derivative (C++)", ("_diffcp.",)),
    ("diffcp (python)", ("/diffcp/",)), ("scs solve", ("scs",)), ("scipy", ("scipy",)),
    ("threads / pools", ("threading", "concurrent", "multiprocessing", "threadpoolctl",
                         "acquire", "_thread")),
    ("torch", ("torch",)), ("numpy", ("numpy",)),
)


def _component(key) -> str:
    text = f"{key[0]} {key[2]}"
    return next((name for name, needles in COMPONENTS if any(n in text for n in needles)),
                "other")


def profile(cases: Sequence[Case], calls: int | Callable[[Case], int], columns=None,
            top: int = 20) -> str:
    """For each case and column: ms per call unprofiled, then cProfile by component and
    the top functions by own time (µs per call).
    Worker threads are invisible to cProfile (diffcp's pool: profile with batch 1)."""
    out = io.StringIO()
    for case in cases:
        k = calls(case) if callable(calls) else calls
        for column, fn in case.columns.items():
            if fn is None or (columns is not None and column not in columns):
                continue
            fn()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            plain = 1e3 * (time.perf_counter() - start) / k
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(k):
                fn()
            prof.disable()
            stats = pstats.Stats(prof).stats
            per: dict[str, float] = {}
            for key, (_, _, own, _, _) in stats.items():
                per[_component(key)] = per.get(_component(key), 0.0) + own
            total = sum(per.values()) or 1.0
            out.write(f"\n## {case.name}, {column}: {plain:.3f} ms per call (unprofiled, "
                      f"mean of {k})\n\n```\n")
            for name, t in sorted(per.items(), key=lambda kv: -kv[1]):
                out.write(f"{name:<26} {1e3 * t / k:9.3f} ms  {100 * t / total:5.1f} %\n")
            out.write(f"\n{'µs/call':>9} {'calls/call':>10}  function (own time)\n")
            for (fname, line, func), (_, n, own, _, _) in sorted(
                    stats.items(), key=lambda kv: -kv[1][2])[:top]:
                where = f"{os.path.basename(fname)}:{line}({func})" if line else func
                out.write(f"{1e6 * own / k:9.1f} {n / k:10.1f}  {where}\n")
            out.write("```\n")
    return out.getvalue()
