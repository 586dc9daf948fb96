"""The many-device simulator: virtual devices that drive the real services over HTTP."""

from tessera.sim.run import METHODS, Buffering, SimConfig, SimReport, Stragglers, simulate

__all__ = ["METHODS", "Buffering", "SimConfig", "SimReport", "Stragglers", "simulate"]
