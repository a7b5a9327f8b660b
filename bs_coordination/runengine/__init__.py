"""The RunEngine side: everything that runs inside the process of a bluesky ``RunEngine``.

- ``plugin``: ``install(RE)``, the one call of a profile collection's startup code;
- ``plans``: which root device a message touches, the name it is locked under, and the
  plan wrapper (``coordinated_wrapper`` / ``coordinated_decorator``);
- ``suspender``: suspends the RunEngine while maintenance holds one of the plan's devices, and
  acknowledges the preemption once it has stopped;
- ``_coordinator``, ``_tracker``, ``_client_thread``: the plans' locks, their fate as the
  event stream tells it, and the client on a thread of its own.

Nothing here imports the service. The public names are importable from ``bs_coordination``
(``install``) and from the modules above; importing this package loads nothing of bluesky.
"""
