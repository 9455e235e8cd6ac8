"""GPU check: the CUDA tests, then the QP benchmark on the GPU in float64 and float32.

    python benchmarks/gpu_check.py --out gpu_report.md   # about 5–10 min
    python benchmarks/gpu_check.py --skip-tests --batch 2048 --dtypes float32
    python benchmarks/gpu_check.py --device cpu --quick   # a dry run of the script itself

Each step runs in a subprocess with a timeout and no standard input:
``pytest -m cuda tests``, then ``bench_qp.py --device cuda --batch 1024`` per
dtype (ours vs qpth, no cvxpylayers). Without CUDA it says why and exits 0;
``--device cpu`` is a dry run of the same steps. Exit status 1 when a step
failed or timed out (the report says which). See benchmarks/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from harness import HERE, ROOT, argument_parser, csv_list, emit


def _step(cmd: list[str], timeout: float) -> tuple[str, str, float]:
    """(status word, output, seconds) of one subprocess."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        status, text = ("ok" if out.returncode == 0 else f"FAILED (rc {out.returncode})",
                        out.stdout if out.returncode == 0 else out.stdout + out.stderr)
    except subprocess.TimeoutExpired as err:
        status, text = "TIMED OUT", "".join(p.decode(errors="replace") if isinstance(p, bytes)
                                            else p or "" for p in (err.stdout, err.stderr))
    return status, text, time.perf_counter() - start


def main(argv=None) -> int:
    p = argument_parser(__doc__.splitlines()[0], repeats=5, warmup=None)
    p.add_argument("--batch", type=int, default=1024, help="QP batch size (default 1024)")
    p.add_argument("--dtypes", default="float64,float32", help="default float64,float32")
    p.add_argument("--test-timeout", type=float, default=900, help="seconds for pytest (900)")
    p.add_argument("--bench-timeout", type=float, default=1200, help="seconds per run (1200)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); nothing to check. Run this on a machine with an NVIDIA "
              "GPU and a CUDA build of torch.")
        return 0
    where = "CPU dry run (--device cpu)" if args.device != "cuda" else (
        f"{torch.cuda.get_device_properties(0).name}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    ok, report = True, [f"# GPU check: {where}, torch {torch.__version__} "
                        f"(CUDA {torch.version.cuda})\n"]
    steps = [] if args.skip_tests else [("pytest -m cuda", [
        sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
        os.path.join(ROOT, "tests")], args.test_timeout, 40)]
    bench = [sys.executable, os.path.join(HERE, "bench_qp.py"), "--device", args.device,
             "--batch", str(args.batch), "--repeats", str(args.repeats),
             "--ref-samples", "2"]
    bench += (["--threads", str(args.threads)] if args.threads else []) + (
        ["--quick"] if args.quick else [])
    for dtype in [] if args.skip_bench else csv_list(args.dtypes):
        out = os.path.join(HERE, "results", f"gpu_qp_{dtype}.md")
        steps.append((f"QP benchmark, {dtype}",
                      bench + ["--dtype", dtype, "--out", out], args.bench_timeout, 60))
    for title, cmd, timeout, tail in steps:
        status, text, secs = _step(cmd, timeout)
        ok &= status == "ok"  # pytest's 5 (nothing collected) is a failure too: the tests exist
        body = (text.strip() if status == "ok" and "QP" in title
                else "```\n" + "\n".join(text.rstrip().splitlines()[-tail:]) + "\n```")
        report.append(f"## {title}: {status} in {secs:.0f} s\n\n{body}\n")
        print(report[-1], flush=True, file=sys.stderr)
    emit("\n".join(report), args.out, __file__)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
