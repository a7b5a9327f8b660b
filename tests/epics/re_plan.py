"""A RunEngine under ``install(RE)`` writing an EPICS record through ophyd, run as a script.

::

    LOGNAME=queue_server python tests/epics/re_plan.py --url URL --prefix P: --record TST:m1 --gate

The ophyd signal is named ``m1`` (the device the plugin locks); its Channel Access user is the
login name (``LOGNAME``), the queue account of the IOC's rules. The plan writes 1, 2, ...
``--steps`` with a checkpoint before each write and prints ``STEP n`` after it; at the end it
prints ``DONE <exit status>`` or ``FAILED <error>``. ``--gate`` installs the plugin with a
``ResumeGate`` (``install(RE, ..., resume_gate=gate)``) so the RunEngine resumes only once the
IOC lets it write.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--gate", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bs_coordination").setLevel(logging.INFO)

    import bluesky.plan_stubs as bps
    import ophyd
    from bluesky import RunEngine

    ophyd.set_cl("caproto")
    from ophyd import EpicsSignal

    from bs_coordination import install
    from bs_coordination.epics.gate import ResumeGate

    signal = EpicsSignal(args.record, name="m1")
    signal.wait_for_connection(timeout=10)
    RE = RunEngine({})
    gate = None
    if args.gate:
        gate = ResumeGate(args.prefix, user_id="queue_server", records={"m1": [args.record]},
                          timeout=30)
    handle = install(RE, url=args.url, user_id="queue_server", wait=30, lease=60,
                     resume_gate=gate)

    def plan():  # type: ignore[no-untyped-def]
        for i in range(1, args.steps + 1):
            yield from bps.checkpoint()
            yield from bps.mv(signal, float(i))
            print(f"STEP {i}", flush=True)
            yield from bps.sleep(args.period)

    try:
        RE(plan())
        print("DONE success", flush=True)
        return 0
    except Exception as exc:
        print(f"FAILED {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        handle.uninstall()
        if gate is not None:
            gate.close()


if __name__ == "__main__":
    raise SystemExit(main())
