"""The RunEngine, with device coordination.

Settings come from the environment:

- ``COORDINATION_URL`` (default ``http://localhost:60620``): the lock service;
- ``COORDINATION_USER`` (default ``queue_server``): who the plans' locks belong to;
- ``COORDINATION_WAIT`` (default 60): seconds a plan waits for a device someone else holds;
- ``COORDINATION_LEASE`` (default 300): lease of the plans' locks (renewed while they run);
- ``COORDINATION_API_KEY``: when the service requires API keys;
- ``COORDINATION_DISABLED=1``: load the collection without coordination (e.g. for
  ``qserver-list-plans-devices``).

The plugin itself is the installed ``bs_coordination`` package, never a file of this
directory: the queue server's loader executes every ``*.py`` file here.
"""

import os

from bluesky import RunEngine

RE = RunEngine({})

if os.environ.get("COORDINATION_DISABLED", "").lower() not in ("1", "true", "yes"):
    from bs_coordination import install

    coordination = install(
        RE,
        url=os.environ.get("COORDINATION_URL", "http://localhost:60620"),
        user_id=os.environ.get("COORDINATION_USER", "queue_server"),
        wait=float(os.environ.get("COORDINATION_WAIT", "60")),
        lease=float(os.environ.get("COORDINATION_LEASE", "300")),
        api_key=os.environ.get("COORDINATION_API_KEY") or None,
    )
