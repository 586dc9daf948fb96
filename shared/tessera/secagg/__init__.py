"""Secure aggregation: the server learns each cluster's sum of B, never one device's.

`vector`: the frozen A from a seed and a device's B as fixed-point integers mod 2^32;
`crypto`: key agreement, sealing, masks and secret sharing, from maintained libraries;
`protocol`: the device's steps and the server's unmasking (Bonawitz et al., 2017);
`messages`: what device and aggregator send each other. See docs/secure_aggregation.md.
"""
