"""A history checker for Braid: record every operation under faults, then check it (issue 20).

* :mod:`.model`: what one operation was (start, end, outcome) and the thread-safe recorder;
  how a gRPC error is read as an outcome (ok / failed, known not applied / indeterminate).
* :mod:`.checker`: the per-key check of a history and the final state read after healing:
  lost or rolled-back acknowledged writes, stale reads, phantom values, failed writes that
  were applied, replicas that disagree, counts outside what the model allows.
* :mod:`.faults`: the seeded fault schedule and the faults themselves on real processes
  (kill -9, SIGSTOP/SIGCONT, a disk that fills and empties, ENOSPC at a write step).
* :mod:`.workload`: the documents (key and version in the payload), writer and reader threads.
* :mod:`.standalone` and :mod:`.cluster`: one seeded run each, returning the report.
"""
