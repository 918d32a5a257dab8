"""lm-evaluation-harness integration: scoutq's runtime as the harness model `scoutq` (lm.py),
the offline tasks scoutq ships (tasks/), and task runs with recovery against a reference
(run.py).

Kept free of imports: `hook.py` is imported at every interpreter start (see there).
"""
