"""The operator console: server-rendered pages mounted in the aggregator under `/console`."""
