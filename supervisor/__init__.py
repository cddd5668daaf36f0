"""Process supervision: spawn a workflow's worker, SIGKILL it on purpose, restart it, report."""
