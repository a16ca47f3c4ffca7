"""HTTP requests for the fuzzer, and a sender that makes one short-lived connection each.

Families: random bytes; malformed request lines; bad headers; bad Content-Length; bodies that
are not JSON; deeply nested JSON; completion requests with absurd field values; targeted
requests (inputs known to have hurt a daemon); partial requests; clients that leave right
after sending; odd paths and methods; a few valid requests. Requests that a daemon may accept
ask for a handful of tokens, so the fuzz never loads the daemon the checks run against.
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass

HTTP_FAMILIES = {  # name: weight
    "random": 8,
    "request-line": 8,
    "headers": 8,
    "content-length": 8,
    "bad-json": 10,
    "nested-json": 2,
    "absurd": 22,
    "targeted": 10,
    "partial": 6,
    "disconnect": 3,
    "paths": 8,
    "valid": 2,
}
ABSURD_JSON = (
    0,
    -1,
    2**63,
    2**64,
    2**100,
    -(2**63),
    1e-40,
    1e308,
    5e-324,
    "",
    "x" * 10_000,
    None,
    True,
    [],
    {},
    [[1]],
)
BAD_MAX_TOKENS = (0, -1, 2**63, 2**64, 2**100, "4", 4.5, None, [])  # never a huge valid count


@dataclass(frozen=True)
class HttpRequest:
    family: str
    data: bytes
    read: bool = True  # wait for the status line (else close right after sending)


class HttpMaker:
    """Requests for one daemon's HTTP port; `vocab` bounds the token ids of valid prompts."""

    def __init__(self, seed: int, vocab: int, host: str) -> None:
        self.rng, self.vocab, self.host = random.Random(seed), vocab, host
        self._families, self._weights = zip(*HTTP_FAMILIES.items(), strict=True)

    def next(self) -> HttpRequest:
        family = self.rng.choices(self._families, self._weights)[0]
        made = getattr(self, "_" + family.replace("-", "_"))()
        if isinstance(made, tuple):  # (what, request) of a targeted or absurd request
            what, made = made
            return HttpRequest(f"{family}:{what}", made.data, made.read)
        return HttpRequest(family, made.data, made.read)

    # --- building blocks --------------------------------------------------------------------

    def _fields(self, **changes) -> dict:
        prompt = [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(1, 12))]
        return {
            "prompt": prompt,
            "max_tokens": self.rng.randint(1, 4),
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": None,
            "stream": self.rng.random() < 0.3,
        } | changes

    def _post(self, body: bytes, read: bool = True, headers: str | None = None) -> HttpRequest:
        head = headers if headers is not None else f"Content-Length: {len(body)}\r\n"
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\n{head}Connection: close\r\n\r\n"
        )
        return HttpRequest("", request.encode() + body, read)

    def _get(self, path: str) -> HttpRequest:
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
        return HttpRequest("", request.encode())

    # --- families ---------------------------------------------------------------------------

    def _random(self) -> HttpRequest:
        return HttpRequest("", self.rng.randbytes(self.rng.choice((1, 16, 256, 4096))))

    def _request_line(self) -> HttpRequest:
        line = self.rng.choice(
            (
                b"GET\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"\r\n\r\n",
                b"GET /health\r\n\r\n",
                b"G\x00T /health HTTP/1.1\r\n\r\n",
                b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
                b"POST /v1/completions HTTP/1.1 extra\r\n\r\n",
                b"\xff\xfe / HTTP/1.1\r\n\r\n",
            )
        )
        return HttpRequest("", line)

    def _headers(self) -> HttpRequest:
        rng = self.rng
        bad = rng.choice(
            (
                "NoColonHere\r\n",
                "X: " + "y" * 70_000 + "\r\n",
                "".join(f"X{i}: 1\r\n" for i in range(200)),
                " folded: continuation\r\n",
                "Content-Length: 5\r\nContent-Length: 9\r\n",
                "Transfer-Encoding: chunked\r\n",
                "X: \u00e9\u202e\r\n",
            )
        )
        body = json.dumps(self._fields()).encode()
        return self._post(body, headers=bad + f"Content-Length: {len(body)}\r\n")

    def _content_length(self) -> HttpRequest:
        body = json.dumps(self._fields()).encode()
        length = self.rng.choice(("-1", "abc", "", "1e3", str(2**64), "99999999999", "0", "+5"))
        return self._post(body, headers=f"Content-Length: {length}\r\n")

    def _bad_json(self) -> HttpRequest:
        good = json.dumps(self._fields()).encode()
        body = self.rng.choice(
            (
                good[: self.rng.randrange(len(good))],
                b"{",
                b"null",
                b"[]",
                b'"text"',
                b"{'a': 1}",
                good.replace(b":", b"=", 1),
                b"\xff\xfe{}",
                self.rng.randbytes(64),
                b'{"prompt": NaN}',
            )
        )
        return self._post(body)

    def _nested_json(self) -> HttpRequest:
        depth = self.rng.choice((1_000, 50_000, 200_000))
        opener, closer = self.rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
        return self._post(b'{"prompt": ' + opener * depth + closer * depth + b"}")

    def _absurd(self) -> tuple[str, HttpRequest]:
        fields = self._fields()
        name = self.rng.choice(list(fields))
        pool = BAD_MAX_TOKENS if name == "max_tokens" else ABSURD_JSON
        if name == "prompt" and self.rng.random() < 0.5:
            pool = ([], [-1], [self.vocab], [2**64], [0] * 100_000, "", "y" * 100_000)
        fields[name] = self.rng.choice(pool)
        return name, self._post(json.dumps(fields).encode())

    def _targeted(self) -> tuple[str, HttpRequest]:
        rng = self.rng
        what = rng.choice(("tiny-temperature", "big-seed", "nan-temperature", "nested-json"))
        if what == "tiny-temperature":
            body = json.dumps(self._fields(temperature=rng.choice((1e-40, 1e-39, 1e-45))))
        elif what == "big-seed":
            body = json.dumps(self._fields(temperature=0.7, seed=rng.choice((2**64, 2**100))))
        elif what == "nan-temperature":  # Python writes NaN and Infinity; JSON has neither
            body = json.dumps(self._fields(temperature=rng.choice((float("nan"), float("inf")))))
        else:
            return what, self._post(b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
        return what, self._post(body.encode())

    def _partial(self) -> HttpRequest:
        whole = self._post(json.dumps(self._fields()).encode()).data
        return HttpRequest("", whole[: self.rng.randrange(1, len(whole))], read=False)

    def _disconnect(self) -> HttpRequest:
        """A valid request whose client leaves at once (the daemon should notice and abort)."""
        fields = self._fields(max_tokens=self.rng.randint(8, 32))
        return HttpRequest("", self._post(json.dumps(fields).encode()).data, read=False)

    def _paths(self) -> HttpRequest:
        rng = self.rng
        path = rng.choice(
            (
                "/",
                "/health?x=" + "1" * 5000,
                "/status?",
                "/metrics#a",
                "/nope",
                "/v1/completions",
                "//health",
                "/../../etc/passwd",
                "*",
            )
        )
        if rng.random() < 0.3:
            method = rng.choice(("DELETE", "PUT", "OPTIONS", "HEAD", "PATCH", "BREW"))
            line = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n"
            return HttpRequest("", line.encode())
        return self._get(path)

    def _valid(self) -> HttpRequest:
        return self._post(json.dumps(self._fields(stream=False)).encode())


def send_http(host: str, port: int, request: HttpRequest, timeout_s: float) -> str:
    """Send one request on a fresh connection; the answer's status code, or what happened
    instead: "refused" (nothing listens), "closed" (no status line), "timeout", "sent"."""
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"connect: {type(exc).__name__}"
    with conn:
        try:
            conn.sendall(request.data)
            if not request.read:
                return "sent"
            return _status(conn)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "reset"


def _status(conn: socket.socket) -> str:
    head = b""
    while b"\r\n" not in head and len(head) < 4096:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "closed"
