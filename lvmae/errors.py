"""Errors a user can cause and fix: the CLI prints them as one line and exits 2, without a traceback."""


class UserError(Exception):
    """Bad input, a conflicting earlier run, an unreachable store: say what and how to fix it."""

    # True: the command exits right after its message, without the interpreter's teardown, leaving reads
    # still in flight on an unreachable store (train.trainer.StoreOutage).
    abandon_in_flight = False
    exit_code = 2  # what the CLI exits with (train.preempt.Preempted: 75, asking for a requeue)
