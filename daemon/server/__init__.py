"""The daemon process: the daemon, its HTTP front, rank processes and their worker, the
daemon<->rank protocol, metrics, the deployment config."""
