"""A real EPICS IOC for the bridge tests (pythonSoftIOC with epicscorelibs), run as a script.

::

    python tests/epics/ioc.py --acf access.acf --record TST:m1=m1 --record TST:m2=m2

Each ``--record NAME=ASG`` makes an ``ao`` record ``NAME`` whose ``ASG`` field is ``ASG``. The
access-security file is loaded with ``asSetFilename`` before ``iocInit`` and made active with
``asInit`` after it (access security was not active after ``iocInit`` alone in a trial on this
machine kind). The channel access ports come from the environment (``EPICS_CA_SERVER_PORT``,
``EPICS_CA_ADDR_LIST``...). Prints ``READY`` on stdout once access security is active, then
serves until it is terminated.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--acf", required=True, help="access-security file to load")
    parser.add_argument("--record", action="append", default=[], metavar="NAME=ASG",
                        help="an ao record and its access-security group (repeatable)")
    args = parser.parse_args()

    # Blocked before any EPICS thread starts, so sigwait() below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from epicscorelibs.ioc import dbCore
    from softioc import asyncio_dispatcher, builder, softioc

    for spec in args.record:
        name, _, asg = spec.partition("=")
        device, _, record = name.rpartition(":")
        builder.SetDeviceName(device)
        builder.aOut(record, initial_value=0.0, ASG=asg or "DEFAULT")
    builder.LoadDatabase()

    dbCore.asSetFilename.argtypes = [ctypes.c_char_p]
    dbCore.asSetFilename.restype = ctypes.c_int
    if dbCore.asSetFilename(args.acf.encode()) != 0:
        sys.stderr.write(f"asSetFilename({args.acf}) failed\n")
        return 1
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher, enable_pva=False)
    dbCore.asInit.restype = ctypes.c_int
    if dbCore.asInit() != 0:
        sys.stderr.write(f"asInit failed: {args.acf} is not a valid access-security file\n")
        return 1
    sys.stdout.write("READY\n")
    sys.stdout.flush()

    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
