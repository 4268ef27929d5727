"""One lock for the work this process does on models itself (profiling, building the level store).

transformers sets torch's process-wide default dtype while it builds a model, so two threads that
build models at once can make each other's tensors the wrong dtype; the service's threads take
this lock around that work (evaluations run in Ray worker processes and need no lock).
"""

from __future__ import annotations

import threading

MODEL_WORK = threading.Lock()
