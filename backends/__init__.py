"""Backends: solve a batch of compiled problems and differentiate it.

Each backend states what "optimal" means for its problem kind and returns a
per-sample `Status`. Import the submodules directly (``backends.conic``,
``backends.qp``, ``backends.entropy``); this package imports nothing heavy.
"""

from .status import Status as Status
