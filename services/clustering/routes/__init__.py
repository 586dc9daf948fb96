"""One router module per resource of the clustering API."""
