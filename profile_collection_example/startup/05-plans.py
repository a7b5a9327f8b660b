"""Plans offered to the queue: bluesky's own and a few written here."""

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
from bluesky.plans import count, grid_scan, list_scan, rel_scan, scan  # noqa: F401


def move_then_count(motor, position, detectors, num=1):
    """Move ``motor`` to ``position``, then take ``num`` readings of ``detectors``.

    Parameters
    ----------
    motor : ophyd device
        The positioner to move (a component such as ``stage.coarse.x`` works too).
    position : float
        Where to move it.
    detectors : list of ophyd devices
        What to read.
    num : int
        Number of readings.
    """
    yield from bps.mv(motor, position)
    return (yield from bp.count(detectors, num=num))


def slow_count(detectors, num=10, delay=1.0):
    """``num`` readings of ``detectors``, ``delay`` seconds apart: long enough to watch a
    maintenance lock suspend and resume it.

    Parameters
    ----------
    detectors : list of ophyd devices
        What to read.
    num : int
        Number of readings.
    delay : float
        Seconds between readings.
    """
    return (yield from bp.count(detectors, num=num, delay=delay))


def stage_raster(detectors, x_start=-1.0, x_stop=1.0, x_num=5, y_start=-1.0, y_stop=1.0,
                 y_num=5):
    """A grid over the coarse stage axes, reading ``detectors`` at each point.

    Parameters
    ----------
    detectors : list of ophyd devices
        What to read.
    x_start, x_stop, y_start, y_stop : float
        Grid limits.
    x_num, y_num : int
        Points per axis.
    """

    @bpp.reset_positions_decorator([stage.coarse.x, stage.coarse.y])  # noqa: F821
    def inner():
        return (yield from bp.grid_scan(detectors, stage.coarse.y, y_start, y_stop, y_num,  # noqa: F821
                                        stage.coarse.x, x_start, x_stop, x_num, snake_axes=True))  # noqa: F821

    return (yield from inner())


def park_and_count(detectors, num=1):
    """Park the reference axis ``motor2`` at 0, then take ``num`` readings of ``detectors``.

    ``motor2`` comes from the startup code, not from the arguments: a queue item names only the
    detectors, yet the plan moves ``motor2`` (its lock is taken when the plan touches it).
    ``bs-coordination preflight`` finds it by a dry run, before the plan is started.

    Parameters
    ----------
    detectors : list of ophyd devices
        What to read.
    num : int
        Number of readings.
    """
    yield from bps.mv(motor2, 0)  # noqa: F821
    return (yield from bp.count(detectors, num=num))
