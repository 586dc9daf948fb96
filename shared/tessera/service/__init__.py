"""What every Tessera HTTP service shares: app factory, auth, health, metrics, limits."""
