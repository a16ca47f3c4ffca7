"""Whole daemons as child processes (UCX over loopback, gloo TP): generation through them equals
transformers' greedy generation, and faults end in clear errors while the rest keeps serving."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvferry.daemon.cli.mps import CONTROL
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.tokenizer import ByteTokenizer
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection
from support.cluster import (
    FAST_TRANSFER,
    child_pids,
    client,
    decode,
    failure,
    fresh_loop_turns,
    generate,
    kill,
    loop_turns,
    prefill,
    running,
    wait_for,
    wait_idle,
    write,
)
from support.metrics_sim import samples
from support.model_helpers import checkpoint, greedy, hf_greedy

# several pages (4 and 8 tokens) and several prefill and transfer chunks (8 tokens)
PROMPTS = [
    [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31, 8, 9, 10, 11, 12, 13],
    [1, 2, 3],
    list(range(40, 70)),
    [(7 * i) % 251 for i in range(45)],
    [200, 100, 50, 25, 12, 6],
    list(range(100, 109)),
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    pytest.importorskip("transformers")
    hf, path = checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3")  # 4 heads, 2 KV heads
    expected = [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]
    return {"path": str(path), "name": "tiny-qwen3"}, expected


@pytest.mark.parametrize(
    "prefill_tp, decode_tp",
    [(1, 1), (1, 2), pytest.param(1, 4, id="1-4-gqa-replicated")],
)
def test_generation_through_daemons_equals_transformers(tmp_path, qwen3, prefill_tp, decode_tp):
    model, expected = qwen3
    p = prefill("prefill-0", tp=prefill_tp)
    path = write(tmp_path, [p, decode("decode-0", [p], tp=decode_tp)], model)
    with running(path) as launcher, ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda prompt: generate(launcher, "decode-0", prompt), PROMPTS))
        for result, want in zip(results, expected, strict=True):
            assert result.token_ids == want
            assert result.finish_reason in ("length", "stop")
        wait_idle(launcher)


def test_a_checkpoint_without_tokenizer_stops_at_its_eos_and_refuses_text(tmp_path, qwen3):
    """config.json + safetensors only: generation stops at generation_config.json's EOS (not
    the byte tokenizer's 257), text prompts get a 400 that says why, and the model is served
    under its folder's name."""
    model, expected = qwen3
    checkpoint = tmp_path / "my-qwen3"
    shutil.copytree(model["path"], checkpoint)
    tokens = expected[0]
    end = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    eos = tokens[end]  # a greedy token of the first prompt, not sampled before
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    p = prefill("prefill-0")
    path = write(tmp_path, [p, decode("decode-0", [p])], {"path": str(checkpoint)})
    with running(path) as launcher:
        result = generate(launcher, "decode-0", PROMPTS[0])
        assert (result.token_ids, result.finish_reason) == (tokens[: end + 1], "stop")
        assert "no tokenizer.json" in str(failure(launcher, "decode-0", "some text"))
        url = next(c.url for c in launcher.children if c.name == "decode-0")
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as answer:
            assert [m["id"] for m in json.load(answer)["data"]] == ["my-qwen3"]


@pytest.mark.gpu
@pytest.mark.parametrize("mps", ["off", "on"])
def test_generation_through_daemons_on_one_gpu(tmp_path, mps):
    """Prefill TP2 -> decode TP1 serving the embedded random model, every rank on the one GPU,
    KV over UCX cuda_ipc: the same tokens as the model's greedy generation on the CPU. On a
    CUDA MPS server (`mps: on`) the prefill ranks' all-reduces meet on the device, so their
    forwards run as CUDA graphs, as a TP1 prefill's do."""
    if mps == "on" and shutil.which(CONTROL) is None:
        pytest.skip(f"no CUDA MPS here ({CONTROL} is not on the PATH)")
    config = ModelSection().model_config()
    reference = Model(config, full_weights(config, None, seed=0))
    gpu = {
        "device": "cuda",
        "transfer": {**FAST_TRANSFER, "ucx_tls": "cuda_ipc,cuda_copy,tcp,sm,self"},
    }
    p = prefill("prefill-0", tp=2, **gpu)
    path = write(tmp_path, [p, decode("decode-0", [p], **gpu)], mps=mps)
    with running(path) as launcher, ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda prompt: generate(launcher, "decode-0", prompt), PROMPTS))
        for prompt, result in zip(PROMPTS, results, strict=True):
            want = greedy(reference, prompt, MAX_TOKENS)
            assert result.token_ids == want[: len(result.token_ids)]
            assert result.finish_reason == "length" or result.token_ids[-1] == ByteTokenizer.eos_id
        wait_idle(launcher)
        metrics = samples(client(launcher, "prefill-0").metrics()).items()
        replays = sum(v for (name, _), v in metrics if name == "kvferry_graph_forwards_total")
        assert (replays > 0) == (mps == "on"), replays


def test_up_and_generate_as_a_user_would(tmp_path, qwen3):
    """`kvferry up` (prefill TP2 -> decode TP1), then `kvferry generate --json`; Ctrl-C stops
    everything with exit 0."""
    model, expected = qwen3
    p = prefill("prefill-0", tp=2)
    path = write(tmp_path, [p, decode("decode-0", [p])], model)
    cli = [sys.executable, "-m", "kvferry.daemon.cli.main"]
    up = subprocess.Popen([*cli, "up", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    log = []
    threading.Thread(target=lambda: log.extend(up.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("all daemons ready" in line for line in log), "kvferry up", 180)
        with ThreadPoolExecutor(3) as pool:
            runs = list(pool.map(lambda prompt: _generate_cli(cli, path, prompt), PROMPTS[:3]))
        for run, want in zip(runs, expected, strict=False):
            assert run.returncode == 0, run.stderr
            answer = json.loads(run.stdout.strip().splitlines()[-1])
            assert answer["token_ids"] == want
            assert answer["ttft_s"] > 0 and answer["latency_s"] >= answer["ttft_s"]
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=90)
    assert code == 0, "".join(log)


def _generate_cli(cli, path, prompt):
    ids = ",".join(map(str, prompt))
    command = [*cli, "generate", "--config", str(path), "--json", "--prompt-ids", ids]
    command += ["--max-tokens", str(MAX_TOKENS)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, qwen3):
    """decode-0 over a compatible prefill and one serving another model."""
    model, expected = qwen3
    good = prefill("good", model=model)
    other = prefill("other", model={**model, "name": "another-model"})
    path = write(
        tmp_path_factory.mktemp("mixed"),
        [good, other, decode("decode-0", [good, other], model=model)],
    )
    with running(path) as launcher:
        yield launcher, expected


def test_bad_requests_get_a_clear_error(mixed):
    launcher, _ = mixed
    url = client(launcher, "decode-0").url
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": 5}', 400, "$.prompt"),
        (b'{"prompt": [1], "max_tokens": 0}', 400, "max_tokens=0"),
        (json.dumps({"prompt": list(range(5000))}).encode(), 400, "max_prompt_tokens=1023"),
        (json.dumps({"prompt": [1, 2, 100000]}).encode(), 400, "token id 100000"),
    ]
    import urllib.error

    for body, status, text in cases:
        request = urllib.request.Request(f"{url}/v1/completions", body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == status
        assert text in json.loads(info.value.read())["error"]["message"]


def test_a_request_that_meets_an_incompatible_prefill_is_served_by_the_other(mixed):
    """The other prefill serves another model: a request handed to it fails at registration,
    before any KV, so it is retried on the good prefill; the other one backs off, named."""
    launcher, expected = mixed
    outcomes = [generate(launcher, "decode-0", prompt).token_ids for prompt in PROMPTS[:4]]
    assert outcomes == expected[:4]
    decode_client = client(launcher, "decode-0")
    metrics = samples(decode_client.metrics())
    assert metrics[("kvferry_prefill_retries_total", frozenset())] >= 1
    (other,) = [s for s in decode_client.status()["prefill"] if s["last_error"]]
    assert "model" in other["last_error"], other
    wait_idle(launcher)


IDLE_S = 4.0


def test_idle_daemons_sleep(mixed):
    """An idle daemon's transfer loops take one turn per heartbeat interval, not hundreds: they
    sleep until a frame, a completion, a posted call or their timer wakes them."""
    launcher, _ = mixed
    wait_idle(launcher)
    names = [c.name for c in launcher.children]
    before = {name: fresh_loop_turns(launcher, name) for name in names}
    timer_before = {name: loop_turns(launcher, name, "timer") for name in names}
    time.sleep(IDLE_S)
    after = {name: loop_turns(launcher, name) for name in names}
    timer_after = {name: loop_turns(launcher, name, "timer") for name in names}
    # one turn per heartbeat interval, plus what the snapshots' lag (up to 0.5 s) adds each side;
    # a loop that polled even every 50 ms would take 80 turns
    beat = FAST_TRANSFER["heartbeat_interval_s"]
    limit = (IDLE_S + 2 * 0.5) / beat + 2
    for name in names:
        assert before[name].keys() == after[name].keys() and after[name], name
        for rank, turns in after[name].items():
            assert turns - before[name][rank] <= limit, (name, rank, before, after)
            # what woke them: the timer (kvferry_transfer_loop_wakes_total, by cause)
            assert timer_after[name][rank] > timer_before[name].get(rank, 0), (name, rank)


LONG = [(11 * i) % 250 for i in range(3000)]  # hundreds of prefill chunks: time to kill
BIG_CACHE = {"cache": {"page_size": 8, "num_pages": 512}}
SLOW = {
    "scheduler": {"prefill_chunk_tokens": 2, "max_batch_tokens": 2},
    **BIG_CACHE,
}  # seconds of work


def test_prefill_killed_mid_request(tmp_path, qwen3):
    model, expected = qwen3
    doomed, spare = prefill("doomed", **SLOW), prefill("spare", **BIG_CACHE)
    d = decode("decode-0", [doomed, spare], **BIG_CACHE)
    path = write(tmp_path, [doomed, spare, d], model)
    with running(path, expect_clean_exit=False) as launcher:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(failure, launcher, "decode-0", LONG)  # round-robin: doomed
            # KV has started arriving: the request is not tried on another prefill
            wait_for(lambda: kv_bytes_received(launcher) > 0, "KV from the doomed prefill")
            kill(next(c for c in launcher.children if c.name == "doomed").process.pid)
            error = pending.result(timeout=60)
        assert error.status == 502 and ("peer lost" in str(error) or "prefill" in str(error))
        assert error.kind in ("peer_lost", "refused"), error  # the daemon's failure kind
        assert generate(launcher, "decode-0", PROMPTS[0]).token_ids == expected[0]  # spare
        wait_idle(launcher, ["decode-0", "spare"])
        assert client(launcher, "decode-0").health()["status"] == "ok"
        codes = launcher.stop()
    assert codes["decode-0"] == 0 and codes["spare"] == 0


def kv_bytes_received(launcher) -> float:
    metrics = samples(client(launcher, "decode-0").metrics())
    return sum(v for (name, _), v in metrics.items() if name == "kvferry_kv_bytes_received_total")


def test_a_prefill_killed_in_a_burst_loses_no_request(tmp_path, qwen3):
    """A prompt's KV is sent only once its whole prefill is done (decode asks for one transfer
    chunk), and the doomed prefill takes seconds per prompt: killed as its first prompt starts,
    it has sent no KV, so every request handed to it is resubmitted to the spare prefill and
    the whole burst answers as if nothing happened."""
    model, _ = qwen3
    whole = {**FAST_TRANSFER, "chunk_tokens": 4096, "staging_bytes": 64 << 20}
    doomed = prefill("doomed", transfer=whole, **SLOW)
    spare = prefill("spare", transfer=whole, **BIG_CACHE)
    d = decode("decode-0", [doomed, spare], transfer=whole, **BIG_CACHE)
    path = write(tmp_path, [doomed, spare, d], model)
    burst = [[(7 * i + k) % 250 for i in range(400)] for k in range(6)]
    with running(path, expect_clean_exit=False) as launcher:
        with ThreadPoolExecutor(len(burst)) as pool:
            pending = [pool.submit(generate, launcher, "decode-0", p, 4) for p in burst]
            wait_for(
                lambda: client(launcher, "doomed").status()["requests"]["in_flight"],
                "a prompt on the doomed prefill",
            )
            kill(next(c for c in launcher.children if c.name == "doomed").process.pid)
            results = [future.result(timeout=180) for future in pending]
        for prompt, result in zip(burst, results, strict=True):  # now all from the spare
            assert result.token_ids == generate(launcher, "decode-0", prompt, 4).token_ids
        metrics = samples(client(launcher, "decode-0").metrics())
        assert metrics[("kvferry_prefill_retries_total", frozenset())] >= 1
        wait_idle(launcher, ["decode-0", "spare"])
        codes = launcher.stop()
    assert codes["decode-0"] == 0 and codes["spare"] == 0


def test_decode_rank_killed_mid_request(tmp_path, qwen3):
    """A decode daemon whose rank dies fails its requests and exits non-zero; prefill cleans
    up and keeps serving the other decode daemon."""
    model, expected = qwen3
    p = prefill("prefill-0", **SLOW)
    doomed, spare = decode("doomed", [p], **BIG_CACHE), decode("spare", [p], **BIG_CACHE)
    path = write(tmp_path, [p, doomed, spare], model)
    with running(path, expect_clean_exit=False) as launcher:
        daemon = next(c for c in launcher.children if c.name == "doomed").process
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(failure, launcher, "doomed", LONG)
            wait_for(
                lambda: client(launcher, "prefill-0").status()["requests"]["in_flight"],
                "the prompt on prefill",
            )
            for pid in child_pids(daemon.pid):
                os.kill(pid, signal.SIGKILL)
            error = pending.result(timeout=60)
        assert "rank 0" in str(error), error
        assert error.kind == "rank_exited", error
        assert daemon.wait(timeout=60) != 0
        assert generate(launcher, "spare", PROMPTS[2]).token_ids == expected[2]
        wait_idle(launcher, ["prefill-0", "spare"])
        codes = launcher.stop()
    assert codes["prefill-0"] == 0 and codes["spare"] == 0


def test_restarted_prefill_daemon_is_found_on_the_first_request(tmp_path, qwen3):
    """A prefill daemon stopped cleanly and started again on the same ports (its ranks' control
    ports are new): the decode daemon's next request already goes to the new ranks."""
    model, expected = qwen3
    p = prefill("prefill-0")
    (tmp_path / "p").mkdir()
    (tmp_path / "d").mkdir()
    prefill_file = write(tmp_path / "p", [p], model)
    decode_file = write(tmp_path / "d", [decode("decode-0", [p])], model)
    with running(prefill_file) as prefills, running(decode_file) as launcher:
        assert generate(launcher, "decode-0", PROMPTS[0]).token_ids == expected[0]
        assert prefills.stop() == {"prefill-0": 0}
        wait_for(lambda: not reachable(launcher), "decode to see the prefill daemon gone")
        with running(prefill_file):  # the same ports
            wait_for(lambda: reachable(launcher), "decode to see the prefill daemon back")
            assert generate(launcher, "decode-0", PROMPTS[1]).token_ids == expected[1]
            wait_idle(launcher)


def reachable(launcher) -> bool:
    return client(launcher, "decode-0").status()["prefill"][0]["reachable"] is True
