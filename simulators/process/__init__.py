"""Process models of the simulated devices (no protocols): physics, faults, scenarios, ground truth.

Importing the package registers every model kind in :data:`simulators.process.base.MODELS`.
"""

from simulators.process import bioreactor as bioreactor
from simulators.process import incubator as incubator
from simulators.process import particle_counter as particle_counter
from simulators.process.base import MODELS, Clock, ProcessModel, create_model

__all__ = ["MODELS", "Clock", "ProcessModel", "create_model"]
