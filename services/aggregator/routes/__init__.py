"""One router module per resource of the aggregator API."""
