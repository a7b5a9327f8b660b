"""``install(RE)``: the plugin's one call in a profile collection's startup code.

Kept at the path the project's design and its earlier versions gave it, so that
``from bs_coordination.plugin import ...`` keeps working. The code lives in
``bs_coordination.runengine.plugin`` (the RunEngine side is one package); this module is that
module's public names, nothing else."""

from bs_coordination.runengine.plugin import *  # noqa: F403
from bs_coordination.runengine.plugin import __all__  # noqa: F401
