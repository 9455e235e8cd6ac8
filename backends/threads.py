"""The samples of a batch in a thread pool, one BLAS thread each.

The per-sample backends (the conic solvers through diffcp, the sparse QP
engine's qdldl factorizations and scipy products) release the GIL, so samples
run in parallel; the parallelism is across samples, and a sample's matrices
are small, so BLAS is held to one thread while workers run (a 250 × 250 LU
took 27 ms with two BLAS threads on a busy two-core machine, 1.3 ms with one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController


class _OneBlasThread:
    """BLAS limited to one thread while any pool runs (reference-counted under a
    lock: threadpoolctl's limits are process-wide)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None
        self._controller = None

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                if self._controller is None:  # scanning the loaded libraries costs ~1 ms
                    self._controller = ThreadpoolController()
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


_ONE_BLAS_THREAD = _OneBlasThread()


def run_samples(fn, batch: int, workers: int, serial_one_blas: bool = False) -> None:
    """fn(i) for each sample; the first exception (KeyboardInterrupt too) propagates
    and no further sample starts (a queued one would begin a fresh solve that the
    interrupt no longer reaches). ``serial_one_blas``: hold BLAS to one thread on
    the serial path too (dense LUs of the conic adjoint; the sparse engine's
    small vector products do not pay for the limit's cost at batch 1)."""
    if workers <= 1:
        if serial_one_blas:
            with _ONE_BLAS_THREAD:
                for i in range(batch):
                    fn(i)
        else:
            for i in range(batch):
                fn(i)
        return
    stop = threading.Event()

    def guarded(i):
        if stop.is_set():
            return
        try:
            fn(i)
        except BaseException:
            stop.set()
            raise

    with _ONE_BLAS_THREAD:
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for future in [pool.submit(guarded, i) for i in range(batch)]:
                future.result()
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
