"""Real-component test infrastructure: S3 server, Kubernetes control plane and a fake node agent."""
