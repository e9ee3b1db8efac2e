"""Taking a model to boards: bundles, SSH deployment with atomic activation and rollback."""
