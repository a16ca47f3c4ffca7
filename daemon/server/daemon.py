"""`kvferry serve`: one daemon (prefill or decode) and its rank worker processes.

The daemon process owns the sockets users and peers talk to — the HTTP front and, on prefill,
the bootstrap server — and the requests' bookkeeping; the ranks own the model, the KV cache and
the transfer agents. A decode request: the HTTP front calls `generate`, which draws the room id
and hands the prompt to the ranks, which reserve its pages (`StepOutput.reserved`), and to a
prefill daemon: at once where no other request waits for its pages, else once its own are
reserved; tokens come back in `StepOutput.outputs`.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import time
from functools import partial

from kvferry.daemon.engine.outputs import StepOutput
from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.model.chat import ChatTemplate
from kvferry.daemon.model.tokenizer import NoTokenizer, load_tokenizer
from kvferry.daemon.server import heap, protocol
from kvferry.daemon.server.config import DaemonConfig
from kvferry.daemon.server.http_front import start_http
from kvferry.daemon.server.metrics import Metrics
from kvferry.daemon.server.model_fit import check_against
from kvferry.daemon.server.prefill_probe import PrefillProbe
from kvferry.daemon.server.prefill_retry import PrefillRetry
from kvferry.daemon.server.prompt_handoff import PromptHandoff
from kvferry.daemon.server.prompt_intake import PromptIntake
from kvferry.daemon.server.prompt_quota import PromptQuota
from kvferry.daemon.server.ranks import RankFailed, Ranks
from kvferry.daemon.server.request import (
    Answering,
    DecodeRequest,
    Events,
    Requests,
    Unavailable,
    check_prompt,
    decode_params,
)
from kvferry.transport import curve
from kvferry.transport.bootstrap import TOKEN_BYTES, BootstrapServer
from kvferry.transport.failure import Failure, FailureKind, aborted, timeout
from kvferry.transport.loop import GIL_SWITCH_S
from kvferry.transport.messages import Codec, PrefillLoad

log = logging.getLogger("kvferry.daemon")
TICK_S = 0.05
ANSWER_S = 5.0  # at exit: how long HTTP handlers get to answer their finished requests


def serve(config: DaemonConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code (0 after a clean stop)."""
    logging.basicConfig(
        level=os.environ.get("KVFERRY_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {config.name or config.role} %(levelname)s %(message)s",
    )
    sys.setswitchinterval(GIL_SWITCH_S)  # a woken thread waits for the GIL 0.2 ms, not 5
    daemon = Daemon(config)
    heap.freeze(daemon.name, daemon.metrics.gc)  # what it built: out of every pass; passes timed
    stop = lambda signum, _frame: daemon.request_stop(signal.Signals(signum).name)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return daemon.run()


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.model_config = config.model.model_config()
        check_against(config, self.model_config)
        self.name = config.name or config.role
        self.metrics = Metrics(config.role, self.name)
        checkpoint = config.model.checkpoint()
        self.tokenizer = load_tokenizer(checkpoint, self.model_config.eos_token_ids)
        if isinstance(self.tokenizer, NoTokenizer) and config.role == "decode":
            log.warning(
                "%s has no tokenizer.json: text prompts and chat are refused (400), answers "
                "carry token ids only; send prompts as token ids", checkpoint,
            )  # fmt: skip
        self.chat_template = ChatTemplate.of_checkpoint(checkpoint)
        self.state = "starting"
        self.requests = Requests()
        self.started = time.time()  # for /v1/models
        self._check_prompt = partial(
            check_prompt,
            limit=config.prompt_limit,
            vocab=self.model_config.vocab_size,
            refused=self.metrics.refused,
        )
        s = config.scheduler  # prefill: prompts whose room no decode rank registered yet
        quota = PromptQuota(s.max_unregistered_prompts_per_peer, s.max_unregistered_prompts)
        self.intake = PromptIntake(quota, self._refusal, self._check_prompt, self._send)
        self._stop_reason: str | None = None
        # read once: the key file may change under a running daemon, its ranks get these bytes
        self._keys = config.security.keys()
        self._zmq = curve.context(self._keys)
        self._codec = Codec(config.transfer.max_frame_bytes)
        self.probe: PrefillProbe | None = None
        if config.prefill:
            self.probe = PrefillProbe(
                config.prefill, self._zmq, self._codec, self.metrics,
                on_incarnation=self._prefill_changed,
            )  # fmt: skip
        self.handoff = PromptHandoff(
            self._zmq, self._codec, config.transfer.bootstrap_timeout_s, self._handoff_failed
        )
        attempts = config.scheduler.prefill_attempts
        self.retry = PrefillRetry(self.probe, self.metrics, attempts, self._resubmit)
        self.bootstrap: BootstrapServer | None = None
        self.http = None
        self.ranks: Ranks | None = None
        self.answering = Answering()  # HTTP handlers with a request in flight

    # --- life cycle -------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            log.info("stopping (%s)", reason)
            self._stop_reason = reason

    def run(self) -> int:
        try:
            self._start()
        except Exception as exc:
            log.error("%s failed to start: %s: %s", self.name, type(exc).__name__, exc)
            self._shutdown()
            return 1
        code = self._serve()
        self._shutdown()
        log.info("stopped (exit %d)", code)
        return code

    def _start(self) -> None:
        c = self.config
        bootstrap_address = None
        # only the ranks started here get it (spawn arguments, never the environment): nobody
        # else can register as one of this daemon's ranks
        token = secrets.token_bytes(TOKEN_BYTES)
        if c.role == "prefill":
            limit, submit = c.transfer.max_frame_bytes, self.intake.submit
            self.bootstrap = BootstrapServer(
                c.tp, token, c.host, c.bootstrap_port, limit, submit, self._prefill_load,
                self._keys,
            )  # fmt: skip
            self.metrics.count_bootstrap(self.bootstrap.counters)
            bootstrap_address = self.bootstrap.address
        self.http = start_http(self, c.host, c.http_port, c.http_header_timeout_s)
        if self.probe is not None:
            self.probe.start()
        self.ranks = Ranks(c, self.name, bootstrap_address, token, self._keys)
        self.ranks.wait_ready(c.start_timeout_s, lambda: self._stop_reason)
        self.state = "serving"
        where = f"http://{c.host}:{self.http.server_port}"
        extra = f", bootstrap {bootstrap_address}" if bootstrap_address else ""
        log.info("%s serving on %s%s (tp=%d)", self.name, where, extra, c.tp)

    def _serve(self) -> int:
        stop_by = None
        while True:
            try:
                self.ranks.take_reports(self._report, TICK_S)
            except RankFailed as exc:
                return self._fail_all(Failure(FailureKind.RANK_EXITED, str(exc)))
            dead = self._dead_thread()
            if dead is not None:
                died = f"{self.name}: the {dead} thread died"
                return self._fail_all(Failure(FailureKind.INTERNAL, died))
            now = time.monotonic()
            self._expire(now)
            if self._stop_reason and stop_by is None:
                self.state = "stopping"
                stop_by = now + self.config.drain_timeout_s
            if stop_by is not None and (not self.in_flight() or now > stop_by):
                self._send(protocol.Stop(f"daemon stopping ({self._stop_reason})"))
                return self._stop_ranks()

    def _dead_thread(self) -> str | None:
        """The daemon-side thread that is no longer running, if any: without it the daemon
        cannot do its job, so it is a failure like a rank's."""
        if not self.http.thread.is_alive():
            return "HTTP server"
        if self.bootstrap is not None and not self.bootstrap.alive:
            return "bootstrap server"
        if self.probe is not None and not self.probe.alive:
            return "prefill probe"
        return None

    def _report(self, message) -> None:
        if isinstance(message, protocol.Snapshot):
            self.metrics.take(message)
        elif isinstance(message, StepOutput):
            self._progress(message)

    def _fail_all(self, failure: Failure) -> int:
        """A rank is gone: fail every request, stop the other ranks, exit non-zero."""
        log.error("%s: failing every request", failure)
        self.state = "failed"
        for request in self.requests.all():
            self._finish(request, "error", failure)
        self._send(protocol.Stop(str(failure)))
        self._stop_ranks()
        return 1

    def _stop_ranks(self) -> int:
        """After Stop: the ranks exit; requests nobody answered fail."""
        clean = self.ranks.join(self._report)
        for request in self.requests.all():
            stopped = f"{self.name} stopped before the request finished"
            self._finish(request, "abort", Failure(FailureKind.UNAVAILABLE, stopped))
        return 0 if clean and self.state != "failed" else 1

    def _shutdown(self) -> None:
        self.answering.wait_for_none(ANSWER_S)  # let the HTTP handlers write their last answers
        if self.ranks is not None:
            self.ranks.kill()
        if self.http is not None:
            self.http.shutdown()
        if self.bootstrap is not None:
            self.bootstrap.close()
        self.handoff.close()
        if self.probe is not None:
            self.probe.stop()  # its sockets must be closed before the context ends
        curve.close(self._zmq)

    def _send(self, command) -> None:
        if self.ranks is not None:
            self.ranks.send(command)

    def _prefill_changed(self, address: str, incarnation: str | None) -> None:
        """The probe saw a new incarnation of a prefill (None: lost it): the ranks forget the
        old one's ranks before any request picked from now on reaches them."""
        self._send(protocol.ForgetPrefill(address, incarnation))

    # --- decode: requests -------------------------------------------------------------------

    def generate(self, prompt: list[int], params: SamplingParams, events: Events) -> DecodeRequest:
        """Start a request; ValueError for a prompt that cannot be served, Unavailable when
        not serving. `events.put((new tokens, finish reason or None))` is called from the
        daemon's thread as they come."""
        refusal = self._refusal()
        if refusal:
            raise Unavailable(refusal)
        self._check_prompt(prompt)
        params = decode_params(params, self.model_config.vocab_size)
        prefill = self.probe.pick(len(prompt))
        if prefill is None:
            raise Unavailable(f"no prefill daemon can be reached ({self.probe.why_none()})")
        request = DecodeRequest(0, prompt, params, prefill, events)
        request.deadline = request.created + self.config.scheduler.request_timeout_s
        early = self.requests.add(request)
        self.metrics.in_flight.inc()
        self._submit(request, early)
        return request

    def _resubmit(self, request: DecodeRequest, prefill: str) -> bool:
        """`request` again, as a new room at `prefill` (its old room's end is ignored)."""
        early = self.requests.move(request)
        if early is None:
            return False  # it ended meanwhile
        request.prefill = prefill
        self._submit(request, early, retry=True)
        return True

    def _submit(self, request: DecodeRequest, early: bool, retry: bool = False) -> None:
        """The room to the ranks, which reserve its pages; its prompt to the prefill at once
        where `early` (Requests.add), else once they are reserved (`_progress`)."""
        if early:
            self.handoff.submit(request)
        room, prompt = request.room, request.prompt
        self._send(protocol.Submit(room, prompt, request.params, request.prefill, retry))

    def _handoff_failed(self, request: DecodeRequest, room: int, failure: Failure) -> None:
        """The prefill of `room` refused its prompt or did not answer."""
        told = self.retry.failed(request, room, failure)
        self.abort(room, told or aborted(f"moved to {request.prefill}"))

    def abort(self, room: int, failure: Failure) -> None:
        self._send(protocol.AbortRoom(room, failure))

    def end(self, room: int) -> None:
        """Stop generating for a request whose answer is complete (the front met a stop
        string): it finishes as "stop", not as a failure."""
        request = self.requests.get(room)
        if request is not None and not request.ended:
            request.ended = True
            self.abort(room, aborted("the answer reached a stop string"))

    def _refusal(self) -> str | None:
        """Why the daemon takes no new request or prompt now; None while serving."""
        state = "stopping" if self._stop_reason else self.state
        return None if state == "serving" else f"{self.name} is {state}"

    def _progress(self, progress: StepOutput) -> None:
        self.intake.registered(progress.reserved)  # prefill: the rooms' prompts are admitted
        for room in progress.reserved:
            request = self.requests.get(room)
            if request is not None:
                request.marks["reserved"] = time.time()
                self.requests.reserved(request)
                self.handoff.reserved(request, room)
        for out in progress.outputs:
            request = self.requests.get(out.room)
            if request is None:
                continue
            if out.marks:
                request.marks.update(out.marks)
            request.take(out.tokens, time.monotonic(), self.metrics)
            if out.finish and request.ended:  # ended by the front: complete, not failed
                self._finish(request, "stop", None, out.tokens)
            elif out.retryable:  # no KV of it arrived: another prefill may serve it
                told = self.retry.failed(request, out.room, out.error)
                if told is not None:
                    self._finish(request, out.finish, told, out.tokens)
            elif out.finish:
                self._finish(request, out.finish, out.error, out.tokens)
            else:
                request.events.put((out.tokens, None))
        for done in progress.done:
            self.intake.done(done.room)
            self.metrics.finished(done.error)

    def _finish(
        self, request: DecodeRequest, finish: str, error: Failure | None, tokens: list[int] = ()
    ) -> None:
        if not self.requests.remove(request):
            return
        request.finish, request.error = finish, error
        request.marks["done"] = time.time()
        self.metrics.in_flight.dec()
        self.metrics.latency.observe(time.monotonic() - request.created)
        self.metrics.finished(error)
        request.events.put((list(tokens), finish))

    def _expire(self, now: float) -> None:
        for request in [r for r in self.requests.all() if now > r.deadline]:
            request.deadline = float("inf")  # abort once; the ranks answer with its end
            limit = self.config.scheduler.request_timeout_s
            self.abort(request.room, timeout(f"timeout: request unfinished after {limit:g}s"))

    def _prefill_load(self) -> PrefillLoad:
        return self.intake.load(self.metrics.snapshots())

    def in_flight(self) -> int:
        """Decode requests and prefill prompts not finished yet."""
        return len(self.requests) + len(self.intake)
