"""How the import worker ends, as its exit status; the supervisor decides restarts from it."""

OK = 0  # the import finished and its result is stored
CRASHED = 1  # an unexpected error: worth a restart
USAGE = 2  # bad command line (argparse)
FATAL = 3  # a restart cannot help: bad input, another workflow under this id, locked store
FAILED = 4  # the workflow ended rejected (a batch failed for good); `retry` reopens it
INTERRUPTED = 5  # stopped on request between two batches; the next run resumes

# INTERRUPTED is worth a restart too when the supervisor did not ask for the stop (a signal
# from elsewhere); when it did, it checks its own stop request first.
RESTARTABLE = frozenset({CRASHED, INTERRUPTED})
