"""Tessera: federated, personalised fine-tuning of diffusion models at the edge."""

__version__ = "0.1.0"
