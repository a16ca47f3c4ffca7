"""`kvferry soak`: mixed load for a while, peers restarted, resources measured."""
