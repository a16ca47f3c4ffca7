"""Rank processes with a fault injected, for the daemon tests (test-only: nothing in the product
breaks its own threads). Top-level functions in a module of their own, so that a spawned rank
process can import them."""


def rank_whose_transfer_thread_dies(*args) -> None:
    """`worker_main`, except that an exception is thrown on the rank's transfer thread once it
    serves."""
    from kvferry.daemon.server import worker

    run = worker.Worker.run

    def doomed(self) -> None:
        def fail() -> None:
            raise RuntimeError("the transfer loop broke")

        self.agent.post(fail)
        run(self)

    worker.Worker.run = doomed
    worker.worker_main(*args)
