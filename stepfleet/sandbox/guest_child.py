"""The guest process: runs a worker's long guest runs in a sandbox of its own, at a lower priority.

`guest_pool.py` starts it (`python -I -m stepfleet.sandbox.guest_child SPEC`, SPEC the JSON of
the sandbox limits, the niceness and the log settings) and talks to it over its stdin and
stdout in frames (a 4-byte big-endian length, then a pickle). Each request is a run and,
when this process does not hold the module yet, the module's artifact, serialized by the
parent from the module it loaded itself; each answer is whether the module is now held and
the run's `GuestReport` (the first frame it writes, once it can run guests, says so). A run is data in, data out: the sandbox does no I/O (an HTTP call
ends the run with `CallRequested`), so nothing else crosses. The process keeps the modules it
was given in its sandbox's LRU (`compiled_cache_entries`), which the parent mirrors to know
when to send an artifact. It exits when its stdin closes.

Its stdout carries only frames: anything else written to file descriptor 1 goes to stderr,
where its log lines go too (JSON with the run's tenant, instance and module digest).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import sys


def _configure_logging(level: str, fmt: str) -> None:
    """JSON lines on stderr, like the worker's (workers/logs.py, which this room may not use)."""
    import logging

    import structlog

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def main() -> int:
    """Serve runs from stdin until it closes; see the module docstring."""
    spec = json.loads(sys.argv[1])
    # Its worker ends it (closing stdin, or killing it): a service manager's SIGTERM to the
    # whole group must not cut short the runs the worker is finishing before it stops.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # The worker's event loop and the short runs it makes inline come first.
    os.nice(int(spec["niceness"]))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    _configure_logging(str(spec["log_level"]), str(spec["log_format"]))

    import structlog

    from stepfleet.sandbox.errors import SandboxError
    from stepfleet.sandbox.guest_frames import frame, read_frame
    from stepfleet.sandbox.limits import SandboxLimits
    from stepfleet.sandbox.port import GuestRun
    from stepfleet.sandbox.runtime import WasmSandbox
    from stepfleet.schemas import GuestCrashed, GuestReport

    log = structlog.get_logger("stepfleet.sandbox")
    sandbox = WasmSandbox(SandboxLimits(**spec["limits"]))
    structlog.contextvars.bind_contextvars(guest_process=os.getpid())
    answers.write(frame(b"ready"))
    answers.flush()
    while (request := read_frame(requests)) is not None:
        job, artifact = pickle.loads(request)  # noqa: S301 (from the parent that started it)
        assert isinstance(job, GuestRun)
        structlog.contextvars.bind_contextvars(
            tenant=job.tenant, instance=job.instance, module_digest=job.digest
        )
        report: GuestReport
        if artifact is not None:
            try:
                sandbox.load_artifact(job.digest, artifact)
            except Exception as exc:  # the run fails below; the process goes on
                reason = str(exc) if isinstance(exc, SandboxError) else type(exc).__name__
                log.error("guest_process_load_failed", error=reason)
        if sandbox.is_loaded(job.digest):
            report = sandbox.run(job)
            held = True
        else:
            report = GuestReport(GuestCrashed("host error: the module did not load"))
            held = False
        answers.write(frame(pickle.dumps((held, report), protocol=pickle.HIGHEST_PROTOCOL)))
        answers.flush()
    sandbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
