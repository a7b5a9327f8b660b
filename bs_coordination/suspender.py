"""The RunEngine suspender on preemption (``LockPreemptedSuspender``).

Kept at the path the project's design and its earlier versions gave it, so that
``from bs_coordination.suspender import ...`` keeps working. The code lives in
``bs_coordination.runengine.suspender`` (the RunEngine side is one package); this module is that
module's public names, nothing else."""

from bs_coordination.runengine.suspender import *  # noqa: F403
from bs_coordination.runengine.suspender import __all__  # noqa: F401
