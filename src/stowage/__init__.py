"""stowage: a container-image cache for Kubernetes."""

__version__ = "0.1.0"
