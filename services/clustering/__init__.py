"""The clustering service: groups devices by encoded task vectors, routes prompts to clusters."""
