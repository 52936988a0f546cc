"""kaos-modelapi: a Kubernetes operator for the ModelAPI resource (kaos.tools/v1alpha1)."""

__version__ = "0.1.0"
