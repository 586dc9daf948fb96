"""The edge-device SDK: `tessera.sdk.device.DeviceClient` and its HTTP retry policy.

Nothing is imported here, so `tessera --help` does not pay for torch.
"""
