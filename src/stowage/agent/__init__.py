"""Node agent: what only a process on the node can do.

- ``mirror``: containerd ``hosts.toml`` files that send pulls through the node's stowage
  proxy first, with containerd's own fallback to the registry (mirror mode).
- ``cri``: the container runtime over the CRI (pull, list, remove images; image
  filesystem usage; images in use), for pre-pulling.
"""
