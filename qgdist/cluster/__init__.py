"""Operating on clusters: Ray job submission and KubeRay."""
