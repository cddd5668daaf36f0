"""Process supervision: spawn the import worker, SIGKILL it on purpose, restart it, report."""
