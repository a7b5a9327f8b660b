"""Simulated devices (ophyd.sim): motors, detectors, and a sample stage with components."""

from ophyd import Component as Cpt
from ophyd import Device
from ophyd.sim import SynAxis, det, det1, det2, motor, motor1, motor2  # noqa: F401


class XYStage(Device):
    """Two axes moved together."""

    x = Cpt(SynAxis, kind="hinted")
    y = Cpt(SynAxis, kind="hinted")


class SampleStage(Device):
    """A stage with a coarse and a fine XY pair: locks are taken on the root, ``stage``."""

    coarse = Cpt(XYStage)
    fine = Cpt(XYStage)


stage = SampleStage(name="stage")
