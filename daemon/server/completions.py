"""`POST /v1/completions`, `POST /v1/chat/completions` and `GET /v1/models` of the decode
daemon's HTTP front: OpenAI's completions and chat completions (the messages through the
model's chat template, `model/chat.py`), whole or streamed as server-sent events; stop
strings, a client that leaves, and the errors, all in OpenAI's shape. The daemon's thread
hands each request's tokens to the front's event loop (`token_events.py`)."""

from __future__ import annotations

import asyncio
import time

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.server import sse
from kvferry.daemon.server.api import ChatCompletionRequest, CompletionRequest
from kvferry.daemon.server.http_protocol import ARRIVED, GONE
from kvferry.daemon.server.request import Unavailable
from kvferry.daemon.server.token_events import TokenEvents, inbox_of
from kvferry.transport.failure import Failure, FailureKind, aborted

LOST_AFTER_S = 30.0  # past its deadline, a request the ranks never answer gets a 504
MAX_HELD = 4  # tokens held back while the text ends in an incomplete character (UTF-8: <= 4)


class HTTPError(Exception):
    """An error answer: HTTP status, OpenAI error type, and the failure kind (`code`) when a
    request failed."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    @classmethod
    def of(cls, failure: Failure) -> HTTPError:
        status, kind = HTTP_STATUS.get(failure.kind, (502, "server_error"))
        return cls(status, failure.detail, kind, failure.kind.value)

    @classmethod
    def no_route(cls, method: str, path: str) -> HTTPError:
        where = path if method == "GET" else f"{method} {path}"
        return cls(404, f"no such path: {where}", "not_found")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}


# HTTP status and OpenAI error type of a failed request, by its failure's kind; 502 otherwise
HTTP_STATUS = {
    FailureKind.TIMEOUT: (504, "timeout"),
    FailureKind.UNAVAILABLE: (503, "unavailable"),
    FailureKind.INVALID_REQUEST: (400, "invalid_request_error"),
}


def models(request: Request) -> Response:
    daemon = _decode(request)
    model = {"id": daemon.config.model.name, "object": "model", "owned_by": "kvferry"}
    return JSONResponse({"object": "list", "data": [{**model, "created": int(daemon.started)}]})


async def completions(request: Request) -> Response:
    daemon = _decode(request)
    body = await _body(request, CompletionRequest)
    try:
        prompt = (
            body.prompt if isinstance(body.prompt, list) else daemon.tokenizer.encode(body.prompt)
        )
    except ValueError as exc:  # a checkpoint without a tokenizer
        raise HTTPError(400, str(exc)) from None
    return await _answer(daemon, request, body, prompt, chat=False)


async def chat_completions(request: Request) -> Response:
    daemon = _decode(request)
    body = await _body(request, ChatCompletionRequest)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    try:
        prompt = daemon.tokenizer.encode(daemon.chat_template.render(messages))
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    return await _answer(daemon, request, body, prompt, chat=True)


def _decode(request: Request):
    """The daemon, if it serves this API (decode); 404 for a prefill daemon."""
    daemon = request.app.state.daemon
    if daemon.config.role != "decode":
        raise HTTPError.no_route(request.method, request.url.path)
    return daemon


async def _answer(daemon, request: Request, body, prompt: list[int], chat: bool) -> Response:
    events = TokenEvents(inbox_of(request.app.state))
    try:
        params = SamplingParams(
            body.token_limit, body.temperature, body.top_p, body.seed, body.stop_ids
        )
        started = daemon.generate(prompt, params, events)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    except Unavailable as exc:
        raise HTTPError(503, str(exc), "unavailable") from None
    arrived = request.scope.get(ARRIVED)
    if arrived is not None:  # the front's own marks: what it adds on the way in and out
        started.marks["http_in"] = arrived
    answer = _Answer(daemon, started, events, request, body, chat)
    return sse.EventStream(answer.stream()) if body.stream else await answer.whole()


async def _body(request: Request, kind: type):
    """The body as a `kind` (an api.py request), checked: HTTPError naming what is wrong."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPError(411, "a JSON body with Content-Length is required")
    daemon = request.app.state.daemon
    if int(length) > daemon.config.http_max_body_bytes:
        daemon.metrics.refused("http_max_body_bytes")
        most = daemon.config.http_max_body_bytes
        raise HTTPError(413, f"body of {length} bytes exceeds http_max_body_bytes={most}")
    limit = daemon.config.http_body_timeout_s
    try:
        raw = await asyncio.wait_for(request.body(), limit)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {limit:g} s") from None
    except ClientDisconnect:  # an answer nobody reads, and no internal error to log
        raise HTTPError(GONE, "the client left before its request body arrived") from None
    try:
        body = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise HTTPError(400, f"bad request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:  # msgspec walks the fields it skips recursively too
        raise HTTPError(400, "body is nested too deeply") from None
    refused = body.unsupported()
    if refused:
        raise HTTPError(400, refused)
    return body


class _Text:
    """A request's tokens in, its text out as it may be shown: held back while it ends in part
    of a character, or in what may be the start of a stop string; cut before the first stop
    string, which ends the answer (`stopped`)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.ids: list[int] = []
        self.shown, self.sent, self.stopped = "", 0, False
        # the text of ids[:_read] (whole characters) is _read_text; the ids after it are decoded
        # with those from _prefix on before them as context
        self._prefix, self._read, self._read_text = 0, 0, ""

    def add(self, tokens: list[int], last: bool) -> tuple[str, list[int]] | None:
        """(new text, new token ids) to send now; None: nothing yet."""
        self.ids.extend(tokens)
        text = self._decoded(last)
        cut = self._stop_at(text)
        if cut is not None:
            text, last, self.stopped = text[:cut], True, True
        upto = len(self.ids) if last else self._read  # ids of a character begun wait for it
        if not last:
            text = text[: max(len(text) - self.hold, len(self.shown))]
        new, ids = text[len(self.shown) :], self.ids[self.sent : upto]
        if not (new or ids or last):
            return None
        self.shown, self.sent = self.shown + new, upto
        return new, ids

    def _decoded(self, last: bool) -> str:
        """The text of the ids so far, but for the last few while they end in part of a
        character (up to MAX_HELD, unless `last`). Only the ids since the last whole character
        are decoded, with the ones before them as context (a tokenizer may spell a token
        differently at the start), not the whole answer at every step."""
        ids, start = self.ids, self._prefix
        context = self.tokenizer.decode(ids[start : self._read])
        end = len(ids)
        window = whole = self.tokenizer.decode(ids[start:end])
        while not last and window.endswith("\ufffd") and end > self._read:
            if len(ids) - end >= MAX_HELD - 1:  # no character is this long: show it as it is
                end, window = len(ids), whole
                break
            end -= 1
            window = self.tokenizer.decode(ids[start:end])
        if end == self._read:  # nothing whole yet
            return self._read_text
        text = self._read_text + window[len(context) :]
        self._prefix, self._read, self._read_text = self._read, end, text
        return text

    def _stop_at(self, text: str) -> int | None:
        since = max(len(self.shown) - self.hold, 0)
        found = [i for i in (text.find(stop, since) for stop in self.stops) if i >= 0]
        return min(found) if found else None


class _Answer:
    """Writes one request's answer, whole or streamed; aborts the request if its client goes
    away first, ends it early at a stop string."""

    def __init__(
        self, daemon, request, events: TokenEvents, http: Request, body, chat: bool
    ) -> None:
        self.daemon, self.request, self.events, self.http = daemon, request, events, http
        self.chat, self.first = chat, True  # chat: OpenAI's chat shapes; first: no chunk yet
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request.room:016x}"
        self.text = _Text(daemon.tokenizer, body.stop_strings)
        self.usage_chunk = body.include_usage

    async def whole(self) -> Response:
        finish = None  # stays None only if the client left first
        with self.daemon.answering.one():
            gone = asyncio.ensure_future(sse.disconnected(self.http.receive))
            try:
                async for tokens, finish in self._events(gone):
                    if finish is None and not self.text.stops:  # nothing to look for yet
                        self.text.ids.extend(tokens)
                        continue
                    self.text.add(tokens, finish is not None)
                    if self.text.stopped:  # the answer is complete: the rest is not wanted
                        finish = "stop"
                        self.daemon.end(self.request.room)
                        break
            finally:
                gone.cancel()
        if self.request.error and not self.text.stopped:
            raise HTTPError.of(self.request.error)
        whole = self._chunk(self.text.shown, self.text.ids, finish, whole=True)
        whole["timeline"] = self.request.timeline()
        return JSONResponse(whole)

    async def stream(self):
        """The events of a streamed answer; they end early if the client leaves."""
        with self.daemon.answering.one():
            gone = asyncio.ensure_future(sse.disconnected(self.http.receive))
            try:
                async for tokens, finish in self._events(gone):
                    if finish is not None and self.request.error:
                        yield sse.event(HTTPError.of(self.request.error).body())
                        break
                    piece = self.text.add(tokens, finish is not None)
                    if piece is None:
                        continue
                    if self.text.stopped:  # the answer is complete: the rest is not wanted
                        finish = "stop"
                        self.daemon.end(self.request.room)
                    chunk = self._chunk(*piece, finish)
                    if finish is None:
                        del chunk["usage"]
                    else:  # kvferry's own: where this request's time went (timeline.py)
                        chunk["timeline"] = self.request.timeline()
                    if finish is None and "first_chunk_sent" not in self.request.marks:
                        # as it goes to the socket (the write does not wait), not after: a
                        # client on another core may read it before this task resumes
                        self.request.marks["first_chunk_sent"] = time.time()
                    yield sse.event(chunk)
                    if finish is not None:
                        break
                if gone.done():  # the client left: nobody reads the rest
                    return
                if self.usage_chunk:
                    usage = self._chunk("", [], None)
                    yield sse.event({**usage, "choices": []})
            except HTTPError as exc:
                yield sse.event(exc.body())
            finally:
                gone.cancel()
        yield b"data: [DONE]\n\n"

    async def _events(self, gone: asyncio.Future):
        """(new tokens, finish) as they come until the finish, what piled up taken as one;
        HTTPError if the ranks never answer. The request is aborted if this stops early: its
        client left (`gone` fired, or the stream was cancelled)."""
        finished, lost_at = False, self.request.deadline + LOST_AFTER_S
        try:
            while True:
                try:
                    event = await self.events.take(lost_at, gone)
                except TimeoutError:
                    raise HTTPError(504, "request lost: no answer from the ranks") from None
                if event is None:  # the client left
                    return
                yield event
                if event[1] is not None:
                    finished = True
                    return
        finally:
            self.events.close()
            if not finished and not self.text.stopped and self.request.finish is None:
                self.daemon.abort(self.request.room, aborted("client went away"))

    def _chunk(self, text, token_ids, finish, whole: bool = False) -> dict:
        request, completion_tokens = self.request, len(self.text.ids)
        choice = {"index": 0, "text": text}
        if self.chat:
            choice = {"index": 0, "message" if whole else "delta": {"content": text}}
            if whole or self.first:
                choice["message" if whole else "delta"]["role"] = "assistant"
        self.first = False
        choice.update(token_ids=list(token_ids), finish_reason=finish)
        kind = "chat.completion" if whole else "chat.completion.chunk"
        return {
            "id": self.id,
            "object": kind if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.daemon.config.model.name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(request.prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(request.prompt) + completion_tokens,
            },
        }
