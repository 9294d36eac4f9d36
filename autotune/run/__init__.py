"""Running a plan: load, train, checkpoint, step down on out-of-memory, launch several processes, report."""
