"""Implementation of the ``bs-coordination`` command line; the entry point and the parser are
in ``bs_coordination.cli``.

``_errors`` holds the exit codes and how a client error becomes one, ``_format`` the tables and
lines an operator reads, ``_args`` the arguments argparse alone gets wrong (keys that
start with ``-``), ``_commands`` one coroutine per subcommand (each built on
``DeviceCoordinationClient``), and ``_watch`` the live event printer.
"""
