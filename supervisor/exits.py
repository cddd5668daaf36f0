"""Exit statuses of `python -m supervisor` (the README lists them); 130/143 follow the signal."""

OK = 0
FAILED = 1  # the import failed, the input or state dir is unusable, or the worker crash-looped
USAGE = 2  # argparse's own
BUSY = 3  # another supervisor runs on the state dir, or a worker holds the store
