"""Helpers the tests share: simulated clusters, engines, transfers, clients."""
