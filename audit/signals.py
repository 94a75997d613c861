"""SIGTERM handling shared by the long-running commands (``audit run``, ``audit seeds``, ``audit zoo build``,
``audit zoo discovery``)."""

from __future__ import annotations


def stop_on_sigterm() -> None:
    """Treat SIGTERM (``kill``, ``timeout``, a CI job cancelled) like Ctrl-C: the runner then records where it
    stopped and stops the stage it started in a second process, and a zoo build kills its worker processes,
    instead of dying with them still running.

    Only the first SIGTERM is graceful; a second one ends the process at once. A second interrupt raised
    inside that cleanup once left Inspect's worker thread running, and the process waiting for it at exit
    (idle, for 40 minutes, until killed)."""
    import signal

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
