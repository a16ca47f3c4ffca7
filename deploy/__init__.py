"""Deployment files, installed with the package (`kvferry demo` starts local.yaml from here)."""
