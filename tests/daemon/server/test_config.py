from pathlib import Path

import pytest

from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.server.config import ConfigError, DaemonConfig, load, parse
from kvferry.daemon.server.model_fit import check_against, transfer_for
from kvferry.transport.config import DEFAULT_STAGING_BYTES


def test_the_embedded_default_is_smollm2_prefill_tp3_to_decode_tp1():
    prefill, decode = load("deploy/local.yaml").daemons
    assert (prefill.role, prefill.tp, decode.role, decode.tp) == ("prefill", 3, "decode", 1)
    assert decode.prefill == ["tcp://127.0.0.1:17100"]
    assert prefill.model == decode.model and decode.model.path.endswith(".gguf")
    smollm2 = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    for daemon in (prefill, decode):
        check_against(daemon, smollm2)


def test_the_tiny_deployment_loads():
    deployment = load("deploy/tiny.yaml")
    prefill, decode = deployment.daemons
    assert (prefill.role, prefill.tp, decode.role, decode.tp) == ("prefill", 2, "decode", 1)
    model = ModelConfig(
        vocab_size=258,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
    )
    for daemon in deployment.daemons:
        check_against(daemon, model)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"role": "prefill", "tpp": 2}, "tpp"),
        ({"role": "prefill", "tp": "two"}, r"\$\.tp"),
        ({"role": "prefill", "tp": 0}, "tp=0"),
        ({"role": "router"}, r"\$\.role"),
        ({"role": "decode"}, "prefill bootstrap address"),
        ({"role": "prefill", "cache": {"page_size": -4}}, "page_size=-4"),
        ({"role": "prefill", "transfer": {"chunk_tokens": 0}}, "chunk_tokens=0"),
        ({"role": "prefill", "scheduler": {"max_running": 1.5}}, r"\$\.scheduler\.max_running"),
        ({"role": "prefill", "bootstrap_port": 70000}, "bootstrap_port=70000"),
        ({"role": "prefill", "gpus": [0, 1]}, "needs device: cuda"),
        ({"role": "prefill", "device": "cuda", "gpus": [-1]}, "indices are >= 0"),
        ({"role": "prefill", "transfer": {"layer_group": -2}}, "layer_group=-2"),
        ({"role": "prefill", "scheduler": {"max_prompt_tokens": 0}}, "max_prompt_tokens=0"),
        (
            {"role": "prefill", "scheduler": {"unregistered_prefill_tokens": -1}},
            "unregistered_prefill_tokens=-1",
        ),
        (
            {"role": "prefill", "cache": {"num_pages": 4}, "scheduler": {"max_prompt_tokens": 64}},
            r"max_prompt_tokens=64 does not fit the KV pool: cache.num_pages=4 x .* = 64 tokens",
        ),
    ],
)
def test_bad_values_name_the_field(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse(raw, DaemonConfig)


def small_model(layers: int, heads: int, head_dim: int) -> ModelConfig:
    """A model config of `layers` layers and `heads` attention and KV heads of `head_dim`."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=heads * head_dim,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
    )


def test_model_dependent_checks():
    model = small_model(layers=2, heads=4, head_dim=8)
    with pytest.raises(ConfigError, match="tp_size=3"):
        check_against(parse({"role": "prefill", "tp": 3}, DaemonConfig), model)
    tiny_ring = parse(
        {"role": "prefill", "transfer": {"staging_bytes": 1024, "chunk_tokens": 64}}, DaemonConfig
    )
    with pytest.raises(ConfigError, match="staging_bytes=1024"):
        check_against(tiny_ring, model)


def test_an_unset_prefill_ring_holds_one_forwards_kv():
    model = small_model(layers=8, heads=8, head_dim=64)
    per_token = 8 * 2 * 4 * 64 * 4  # layers x (K, V) x heads per rank (TP 2) x head_dim x fp32
    scheduler = {"max_batch_tokens": 65536, "prefill_chunk_tokens": 2048}
    cache = {"num_pages": 8192, "page_size": 16}
    prefill = parse(
        {"role": "prefill", "tp": 2, "scheduler": scheduler, "cache": cache}, DaemonConfig
    )
    assert transfer_for(prefill, model).staging_bytes == 65536 * per_token  # 1 GiB
    check_against(prefill, model)
    # a forward cannot hold more KV than the pool; below the transport's default, the default
    small_pool = parse(
        {"role": "prefill", "tp": 2, "scheduler": scheduler, "cache": {"num_pages": 256}},
        DaemonConfig,
    )
    assert transfer_for(small_pool, model).staging_bytes == DEFAULT_STAGING_BYTES
    # decode, and a ring the file sets, stay as they are
    decode = parse({"role": "decode", "prefill": ["tcp://127.0.0.1:1"]}, DaemonConfig)
    assert transfer_for(decode, model).ring_bytes == DEFAULT_STAGING_BYTES
    fixed = parse({"role": "prefill", "transfer": {"staging_bytes": 1 << 30}}, DaemonConfig)
    assert transfer_for(fixed, model).staging_bytes == 1 << 30
    # a transfer chunk longer than a forward spans forwards: the ring holds the chunk
    long_chunk = parse(
        {
            "role": "prefill",
            "tp": 2,
            "scheduler": {"max_batch_tokens": 1024},
            "cache": cache,
            "transfer": {"chunk_tokens": 65536},
        },
        DaemonConfig,
    )
    assert transfer_for(long_chunk, model).staging_bytes == 65536 * per_token
    check_against(long_chunk, model)
    # decode's unset ring is the default, and a chunk beyond it is refused naming both
    big_chunk = parse(
        {"role": "decode", "prefill": ["tcp://127.0.0.1:1"], "transfer": {"chunk_tokens": 65536}},
        DaemonConfig,
    )
    with pytest.raises(ConfigError, match=r"staging_bytes=268435456 \(unset: the default\)"):
        check_against(big_chunk, model)


def test_unreadable_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemons: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load(bad)


SHIPPED = sorted(Path(__file__).parents[3].glob("deploy/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_deployment_files_are_valid(path):
    for daemon in load(path).daemons:
        if daemon.model.path is None:  # checkpoints of the examples are not here
            check_against(daemon, daemon.model.model_config())


def test_the_shipped_deployment_files_are_found():
    assert len(SHIPPED) >= 6, SHIPPED  # the parametrized check above must not run on nothing


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (
            {
                "daemons": [
                    {"role": "prefill"},
                    {"role": "prefill", "scheduler": {"chunk_tokens": 8}},
                ]
            },
            "daemons[1].scheduler.chunk_tokens was renamed scheduler.prefill_chunk_tokens",
        ),
        (
            {"role": "prefill", "scheduler": {"chunk_tokens": 8}},
            "scheduler.chunk_tokens was renamed scheduler.prefill_chunk_tokens",
        ),
    ],
)
def test_a_renamed_key_is_refused_with_its_new_name(raw, fragment):
    kind = DaemonConfig if "role" in raw else None
    with pytest.raises(ConfigError) as info:
        parse(raw, kind) if kind else parse(raw)
    assert fragment in str(info.value)
    assert "transfer.chunk_tokens is the transfer chunk" in str(info.value)


def test_the_prompt_limit_follows_the_kv_pool():
    pool = {"cache": {"page_size": 16, "num_pages": 2048}}  # 32768 tokens
    assert parse({"role": "prefill", **pool}, DaemonConfig).prompt_limit == 32767
    limited = {"role": "prefill", **pool, "scheduler": {"max_prompt_tokens": 500}}
    assert parse(limited, DaemonConfig).prompt_limit == 500
    for path in ("deploy/one-gpu.yaml", "deploy/one-gpu-slice.yaml", "deploy/one-gpu-homo.yaml"):
        for daemon in load(path).daemons:  # the GPU deployments take 32k-token prompts
            assert daemon.prompt_limit >= 32768, (path, daemon.name)
