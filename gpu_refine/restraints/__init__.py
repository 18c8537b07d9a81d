"""Geometry and ADP restraints for batches of models of one topology."""
from .adp import ADPRestraints, ADPSettings
from .geometry import GeometryRestraints
from .nonbonded import NonbondedSettings
from .stats import geometry_statistics
from .topology import Topology, build_topology

__all__ = ["ADPRestraints", "ADPSettings", "GeometryRestraints", "NonbondedSettings",
           "Topology", "build_topology", "geometry_statistics"]
