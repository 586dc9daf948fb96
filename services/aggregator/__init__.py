"""The aggregator service: enrolment, task vectors, federated rounds, updates, adapters."""
