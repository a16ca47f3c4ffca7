from pathlib import Path

import pytest

from kvferry.daemon.config import ConfigError, DaemonConfig, check_against, load, parse
from kvferry.daemon.model_config import ModelConfig


def test_the_embedded_default_loads():
    deployment = load("deploy/local.yaml")
    prefill, decode = deployment.daemons
    assert (prefill.role, prefill.tp, decode.role, decode.tp) == ("prefill", 2, "decode", 1)
    assert decode.prefill == ["tcp://127.0.0.1:17100"]
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
    ],
)
def test_bad_values_name_the_field(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse(raw, DaemonConfig)


def test_model_dependent_checks():
    model = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    with pytest.raises(ConfigError, match="tp_size=3"):
        check_against(parse({"role": "prefill", "tp": 3}, DaemonConfig), model)
    tiny_ring = parse(
        {"role": "prefill", "transfer": {"staging_bytes": 1024, "chunk_tokens": 64}}, DaemonConfig
    )
    with pytest.raises(ConfigError, match="staging_bytes=1024"):
        check_against(tiny_ring, model)


def test_unreadable_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemons: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load(bad)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("deploy/*.yaml")))
def test_shipped_deployment_files_are_valid(path):
    for daemon in load(path).daemons:
        if daemon.model.path is None:  # checkpoints of the examples are not here
            check_against(daemon, daemon.model.model_config())
