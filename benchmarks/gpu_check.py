"""GPU check (issue 3): the CUDA tests, then the QP benchmark on the GPU in float64 and float32.

    python benchmarks/gpu_check.py                       # everything, about 5–10 min
    python benchmarks/gpu_check.py --out gpu_report.md   # also write the report to a file
    python benchmarks/gpu_check.py --skip-tests --batch 2048
    python benchmarks/gpu_check.py --dtypes float32 --repeats 9

Run from the repository root (or anywhere: paths are resolved from this file)
in the environment where ``declarative`` is installed with a CUDA build of
torch, and qpth (``pip install --no-deps qpth``) for the peer column.

Without CUDA (``torch.cuda.is_available()`` is False) it prints why and exits
0, so it is safe in CPU-only CI. With CUDA it runs, each step in its own
subprocess with a timeout and no standard input (nothing can wait for a key):

  1. ``python -m pytest -m cuda -q tests`` — the tests marked ``cuda``
     (CUDA against CPU results in float64 and float32, the device kept by
     QPFunction and CvxpyLayer);
  2. ``benchmarks/bench_qp.py --device cuda --dtype float64 --batch 1024``
     and the same in float32: declarative.QPFunction vs qpth's QPFunction
     on the GPU (both timed with torch.cuda.synchronize() inside the call),
     n = 100, 100 inequalities, 0 and 50 equalities, all inputs batched and
     only p, h batched, fwd and fwd+bwd; z against Clarabel on 2 samples,
     ours vs qpth gradients. No cvxpylayers (CPU only) and no finite
     differences in float32.

The report (printed, and written to --out) has the GPU's name, the test
summary and both tables. The exit status is 0 when every step ran and the
tests passed, 1 when a step failed or timed out (the report says which).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    """(returncode or None on timeout, stdout, stderr, seconds)."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return out.returncode, out.stdout, out.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "")
                 for p in (err.stdout, err.stderr)]
        return None, parts[0], parts[1], time.perf_counter() - start


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024, help="QP batch size (default 1024)")
    p.add_argument("--dtypes", default="float64,float32", help="default float64,float32")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row (default 5)")
    p.add_argument("--test-timeout", type=float, default=900,
                   help="seconds for the pytest step (default 900)")
    p.add_argument("--bench-timeout", type=float, default=1200,
                   help="seconds for each benchmark run (default 1200)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--device", default="cuda",
                   help="cuda (default); cpu runs the same steps on the CPU, a dry run of "
                        "this script on a machine without a GPU")
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError as err:
        print(f"gpu_check: torch is not importable ({err}); nothing to check.")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda}); skipping the CUDA tests and the GPU "
              "benchmark. Run this on a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0

    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        where = "CPU dry run (--device cpu)"
    report = [f"# GPU check: {where}, torch {torch.__version__} (CUDA {torch.version.cuda})\n"]
    ok = True

    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               os.path.join(ROOT, "tests")]
        rc, out, err, secs = _run(cmd, args.test_timeout)
        text = out + err
        # pytest: 0 all passed, 5 none collected (also a failure here: the tests exist)
        status = ("TIMED OUT" if rc is None else "passed" if rc == 0 else f"FAILED (rc {rc})")
        ok &= rc == 0
        report.append(f"## pytest -m cuda: {status} in {secs:.0f} s\n\n```\n"
                      f"{_tail(text, 40)}\n```\n")
        print(report[-1], flush=True)

    if not args.skip_bench:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            cmd = [sys.executable, os.path.join(HERE, "bench_qp.py"), "--device", args.device,
                   "--dtype", dtype, "--batch", str(args.batch), "--cvx-batch", "0",
                   "--repeats", str(args.repeats), "--ref-samples", "2",
                   "--case-timeout", str(max(60.0, args.bench_timeout / 2))]
            rc, out, err, secs = _run(cmd, args.bench_timeout)
            text = out + err
            if rc == 0:  # stdout is the report; stderr only progress lines
                report.append(f"## QP benchmark, {dtype}, B = {args.batch} ({secs:.0f} s)\n\n"
                              f"{out.strip()}\n")
            else:
                ok = False
                why = "TIMED OUT" if rc is None else f"FAILED (rc {rc})"
                report.append(f"## QP benchmark, {dtype}: {why} after {secs:.0f} s\n\n```\n"
                              f"{_tail(text, 60)}\n```\n")
            print(report[-1], flush=True)

    text = "\n".join(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"(report written to {args.out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
