"""Exit statuses of `python -m supervisor` itself (the README lists them); 130/141/143 follow the signal.

The worker's own statuses, from which the supervisor decides restarts, are workflow/exitcodes.py.
"""

OK = 0
FAILED = 1  # the workflow failed, its module, input or state dir is unusable, or the worker crash-looped
USAGE = 2  # argparse's own
BUSY = 3  # another supervisor runs on the state dir, or a worker holds the store
CANCELLED = 4  # the workflow is cancelled (`cancel`): not a failure; `retry` resumes it
BROKEN_PIPE = 141  # its stdout was closed early (`status | head`): 128 + SIGPIPE, as a shell reports
