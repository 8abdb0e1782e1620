"""The SimPy model: the shared scheduler, block manager and dispatch policies driven by a cost model.

No torch anywhere in this package (a test proves it): a simulation runs on any laptop.
"""

from pdlab.sim.cluster import Layout, SimCluster
from pdlab.sim.cost import GPUS, H100, CostModel, FixedCost, GpuSpec, MoeSpec, RooflineCost
from pdlab.sim.fit import RooflineFit, fit_roofline
from pdlab.sim.instance import InstanceSpec
from pdlab.sim.links import LINKS, Link, LinkSpec
from pdlab.sim.models import SIM_MODELS, SimModel, sim_model
from pdlab.sim.profile_cost import ProfileCost
from pdlab.sim.router import SplitwiseRouter
from pdlab.sim.simulation import simulate, simulate_cluster

__all__ = [
    "GPUS", "H100", "LINKS", "SIM_MODELS", "CostModel", "FixedCost", "GpuSpec", "InstanceSpec", "Layout", "Link",
    "LinkSpec", "MoeSpec", "ProfileCost", "RooflineCost", "RooflineFit", "SimCluster", "SimModel", "SplitwiseRouter",
    "fit_roofline", "sim_model", "simulate", "simulate_cluster",
]
