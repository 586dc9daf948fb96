"""The inference API's routers, one module per resource."""
