"""The plan wrapper (``coordinated_wrapper``, ``coordinated_decorator``) and the naming rule.

Kept at the path the project's design and its earlier versions gave it, so that
``from bs_coordination.plans import ...`` keeps working. The code lives in
``bs_coordination.runengine.plans`` (the RunEngine side is one package); this module is that
module's public names, nothing else."""

from bs_coordination.runengine.plans import *  # noqa: F403
from bs_coordination.runengine.plans import __all__  # noqa: F401
