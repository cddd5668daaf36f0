"""How a workflow child (`python -m workflow run`) ends, as its exit status: the one definition.

A supervisor decides restarts from it; the supervisor's own CLI has statuses of its own
(supervisor/exits.py).
"""

OK = 0  # the workflow finished and its result is stored
CRASHED = 1  # an unexpected error (a traceback on stderr): worth a restart
USAGE = 2  # bad command line (argparse)
FATAL = 3  # a restart cannot help: bad target or input, another workflow under this id, locked store
FAILED = 4  # the workflow ended rejected (a step failed for good); `retry` reopens it
INTERRUPTED = 5  # stopped on request (SIGTERM/SIGINT) between two steps; the next run resumes
BUSY = 6  # another process holds the store or drives this workflow: wait, or stop it first
CANCELLED = 7  # the workflow is cancelled (now, or before this run); `retry` reopens it

# INTERRUPTED is worth a restart too when the supervisor did not ask for the stop (a signal
# from elsewhere); when it did, it checks its own stop request first.
RESTARTABLE = frozenset({CRASHED, INTERRUPTED})
