"""The Ray Serve layer: replica deployment, adapter-affinity router, OpenAI-compatible ingress."""
