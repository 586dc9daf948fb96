"""Checks of the deployment files: compose, kustomize overlays, settings, YAML."""
