"""`kvferry bench`: the command, the load generator, its workloads and its report."""
