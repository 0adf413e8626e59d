"""Deployment tests: manifests, the container entrypoint, scale-out across replicas, model placement."""
