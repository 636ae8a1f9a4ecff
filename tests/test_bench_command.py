"""`salatrain bench` on CPU: a tiny hybrid (all three mixers) against a tiny dense Llama at two small lengths writes
bench.json, the table and bench.png; the prefill + decode it times is what generate() does; an out-of-memory
run (injected) is a row saying OOM; bad inputs and runs the memory estimate rules out are one-line errors."""

import json

import pytest
import torch

from salatrain.cli import main
from salatrain.eval import bench
from salatrain.eval.bench_device import is_oom
from salatrain.eval.bench_measure import cache_arg, decode, load_bench_model, prefill, synthetic_ids
from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM

LENGTHS = "lengths=[96,160]"  # both beyond the hybrid's dense_len: its sparse layer selects blocks


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    """A tiny hybrid with a sparse, two Lightning and a full-attention (sliding window) layer."""
    torch.manual_seed(0)
    cfg = SalaHybridConfig(
        vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        mixer_types=["sparse_attention", "linear_attention", "full_attention", "linear_attention"],
        sliding_windows=[None, None, 16, None],
        sparse_config=dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=16,
                           dense_len=64),
    )
    out = tmp_path_factory.mktemp("bench") / "hybrid"
    SalaHybridForCausalLM(cfg).save_pretrained(out)
    return out


def _bench(*args) -> int:
    return main(["bench", "decode_tokens=3", *args])


def test_bench_hybrid_against_dense(hybrid_dir, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = _bench(f"model={hybrid_dir}", f"compare=[{tiny_lm_dir}]", "names=[hybrid,dense]", LENGTHS,
                f"output_dir={out}", "logging.wandb.mode=offline")
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["format"] == "salatrain.bench/1" and report["baseline"] == "dense"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    kinds = {m["name"]: (m["kind"], m["class"]) for m in report["models"]}
    assert kinds == {"hybrid": ("hybrid", "SalaHybridForCausalLM"), "dense": ("transformers", "LlamaForCausalLM")}
    rows = {(r["model"], r["length"]): r for r in report["results"]}
    assert set(rows) == {(m, n) for m in ("hybrid", "dense") for n in (96, 160)}
    for (model, n), r in rows.items():
        assert r["status"] == "ok" and r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["prefill_tokens_per_s"] == pytest.approx(n / r["prefill_s"])
        assert r["peak_memory_bytes"] > 0 and r["cache_bytes"] > 0 and r["decode_tokens"] == 3
        assert (r["prefill_speedup"] is None) == (model == "dense")
    # the hybrid caches K/V in two of its four layers, the dense model in all four
    assert rows[("hybrid", 160)]["cache_bytes"] < rows[("dense", 160)]["cache_bytes"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "wandb").is_dir()
    text = capsys.readouterr().out
    assert "prefill x vs dense" in text and "160" in text and "hybrid" in text and "bench.png" in text


@pytest.mark.parametrize("which", ["hybrid", "dense"])
def test_prefill_and_decode_are_what_generate_does(which, hybrid_dir, tiny_lm_dir):
    """The timed work is a real generation: prefill's cache and token, then decoding with that cache, give the
    tokens of greedy generate() (also when the prompt goes in chunks)."""
    path, kind = (hybrid_dir, "hybrid") if which == "hybrid" else (tiny_lm_dir, "transformers")
    model = load_bench_model(kind, path, torch.device("cpu"), torch.float32)
    ids = synthetic_ids(model.config.vocab_size, 2, 100, 0, torch.device("cpu"))
    arg = cache_arg(model)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[:, 100:]
    for chunk in (None, 48):
        cache, token = prefill(model, ids, chunk, arg)
        tokens = [token]
        for _ in range(4):
            cache, token = decode(model, cache, token, 1, arg)
            tokens.append(token)
        assert torch.equal(torch.cat(tokens, 1), expected), chunk


def test_out_of_memory_is_a_row(hybrid_dir, tiny_lm_dir, tmp_path, monkeypatch, capsys):
    """An OOM in the hybrid's prefill beyond 128 tokens (injected into one layer) becomes a row; the longer length
    is then not run; the dense model still runs every length."""
    real = bench.load_bench_model

    def load_with_fault(kind, path, device, dtype):
        model = real(kind, path, device, dtype)
        if kind == "hybrid":
            def fault(module, args):
                if args[0].shape[1] > 128:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB (injected)")
            model.model.layers[2].register_forward_pre_hook(fault)
        return model

    monkeypatch.setattr(bench, "load_bench_model", load_with_fault)
    out = tmp_path / "bench"
    rc = _bench(f"model={hybrid_dir}", f"compare=[{tiny_lm_dir}]", "names=[hybrid,dense]", "lengths=[96,160,256]",
                f"output_dir={out}")
    assert rc == 0
    rows = {(r["model"], r["length"]): r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert rows[("hybrid", 96)]["status"] == "ok"
    assert rows[("hybrid", 160)]["oom"] == "measured" and "Tried to allocate 16.00 GiB" in rows[("hybrid", 160)]["note"]
    assert rows[("hybrid", 256)]["oom"] == "skipped" and "not run" in rows[("hybrid", 256)]["note"]
    assert rows[("hybrid", 160)]["prefill_s"] is None and rows[("hybrid", 160)]["prefill_speedup"] is None
    assert all(rows[("dense", n)]["status"] == "ok" for n in (96, 160, 256))
    assert (out / "bench.png").is_file()
    table = capsys.readouterr().out
    assert sum(" OOM " in line for line in table.splitlines()) == 2


def test_a_decode_the_cuda_graphs_cannot_take_is_run_eagerly_and_said(hybrid_dir, tmp_path, monkeypatch, capsys):
    """decode_graphs: where GraphDecoder fails (injected: a step raising as a failed capture does), that length is
    measured again from a fresh prefill, decoding as generate does, and the row says why."""
    from salatrain.eval import bench_measure
    from salatrain.models.decode_graphs import GraphDecoder

    def broken_step(self):
        raise RuntimeError("operation not permitted when stream is capturing (injected)")

    monkeypatch.setattr(bench_measure, "graphs_apply", lambda model, device: True)  # as on CUDA
    monkeypatch.setattr(GraphDecoder, "step", broken_step)
    out = tmp_path / "bench"
    assert _bench(f"model={hybrid_dir}", "lengths=[96]", "decode_tokens=3", "repeats=2", f"output_dir={out}") == 0
    (row,) = json.loads((out / "bench.json").read_text())["results"]
    assert row["status"] == "ok" and row["decode_graphs"] is False and row["decode_tokens_per_s"] > 0
    assert "CUDA graphs failed (operation not permitted" in row["decode_note"] and len(row["prefill_s_runs"]) == 2
    assert "decoded eagerly" in capsys.readouterr().out


def test_what_counts_as_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))


def test_memory_estimate_refuses_or_reports(hybrid_dir, tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [f"model={hybrid_dir}", f"compare=[{tiny_lm_dir}]", f"output_dir={out}", "lengths=[96,16M]"]
    assert _bench(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at 16M tokens needs ~" in err and "GiB" in err and "skip_unfit" in err
    assert not out.exists()
    assert _bench(*args, "skip_unfit=true", "warmup=0") == 0
    rows = {(r["model"], r["length"]): r for r in json.loads((out / "bench.json").read_text())["results"]}
    big = rows[("hybrid", 16 * 1024 * 1024)]
    assert big["oom"] == "estimated" and big["note"].startswith("not run: needs ~") and big["estimate_bytes"] > 0
    assert rows[("hybrid", 96)]["status"] == "ok"


def test_lengths_take_k_and_m_suffixes():
    assert bench.check_lengths(["1M", 8192, "32K", "100"]) == [100, 8192, 32768, 1048576]


@pytest.mark.parametrize("args, message", [
    (["model={missing}"], "does not exist"),
    (["lengths=[0]"], "positive"),
    (["lengths=[-8K]"], "positive"),
    (["lengths=[]"], "lengths is empty"),
    (["lengths=[8X]"], "cannot read"),
    (["lengths=[64,64]"], "duplicates"),
    (["decode_tokens=0"], "decode_tokens must be >= 1"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["repeats=0"], "repeats must be >= 1"),
    (["prefill_chunk=0"], "prefill_chunk must be >= 1"),
    (["memory_limit_gib=-1"], "memory_limit_gib"),
    (["names=[a,b]"], "names"),
    (["compare=[{missing}]"], "does not exist"),
    (["dtype=float8"], "dtype"),
    (["device=tpu"], "device"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode"),
    (["lenghts=[64]"], "did you mean 'lengths'"),
])
def test_bench_bad_inputs(tiny_lm_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    fill = {"missing": tmp_path / "nope"}
    base = [] if any(a.startswith("model=") for a in args) else [f"model={tiny_lm_dir}"]
    base += [] if any(a.startswith("lengths=") for a in args) else ["lengths=[64]"]
    rc = _bench(f"output_dir={out}", *base, *[a.format(**fill) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bench_missing_model_and_cuda_on_a_cpu_machine(tmp_path, tiny_lm_dir, capsys):
    assert _bench(f"output_dir={tmp_path / 'b'}") == 2
    assert "missing model=" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _bench(f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'b'}", "device=cuda") == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_dense_families_load_as_a_user_gets_them(dense_dirs, tmp_path):
    """Families transformers ships run with its own class (Mistral's sliding window included); MiniCPM4, which it
    does not ship, runs as the hybrid class with every layer full_attention."""
    out = tmp_path / "bench"
    rc = _bench(f"model={dense_dirs['mistral']}", f"compare=[{dense_dirs['minicpm']}]", "names=[mistral,minicpm]",
                "lengths=[40]", "warmup=0", f"output_dir={out}")
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    kinds = {m["name"]: (m["kind"], m["class"]) for m in report["models"]}
    assert kinds == {"mistral": ("transformers", "MistralForCausalLM"),
                     "minicpm": ("dense-as-hybrid", "SalaHybridForCausalLM")}
    assert all(r["status"] == "ok" for r in report["results"])


def test_decode_gpu_script_rehearses_on_cpu(hybrid_dir, tiny_lm_dir, tmp_path):
    """bench/decode_gpu.py (the GPU decoding comparison) runs end to end on CPU with tiny models, so a GPU session
    does not find its bugs: every row timed, both sparse paths decode the same greedy tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode_gpu.py"
    spec = importlib.util.spec_from_file_location("decode_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "decode.json"
    mod.main(["--hybrid", str(hybrid_dir), "--dense", str(tiny_lm_dir), "--lengths", "96", "160", "--tokens", "2",
              "--warmup", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r.get("sparse decode"), r["length"]) for r in rows] == [
        ("hybrid", "triton op", 96), ("hybrid", "triton op", 160), ("hybrid", "step", 96), ("hybrid", "step", 160),
        ("dense (transformers)", None, 96), ("dense (transformers)", None, 160)]
    assert all(r["tokens_per_s"] > 0 and len(r["greedy"]) == 3 and r["torch_ops_per_token"] > 100 for r in rows)
    assert rows[0]["greedy"] == rows[2]["greedy"] and rows[1]["greedy"] == rows[3]["greedy"]


def test_decode_ops_script_counts_fewer_launches_for_the_hybrid_than_llama(tmp_path):
    """bench/decode_ops.py: one decoded token of the 1B bench pair's layer structure, the hybrid on its kernel
    path (fused Lightning and norm launches, the sparse one-token step) dispatches fewer non-view torch ops than
    transformers' Llama of the same shape, at a prompt where the sparse layers select blocks (past SALA's
    dense_len) and one where they attend densely."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode_ops.py"
    spec = importlib.util.spec_from_file_location("decode_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ops.json"
    mod.main(["--scaled-down", "--prompts", "300", "2400", "--out", str(out)])  # 2400 selects blocks, as 9000 at SALA's
    rows = {(r["model"], r["prompt"]): r for r in json.loads(out.read_text())["rows"]}
    for prompt in (300, 2400):
        hybrid, llama = rows[("hybrid", prompt)], rows[("transformers", prompt)]
        assert hybrid["ops"] < 0.8 * llama["ops"], (hybrid, llama)
        assert hybrid["by_part"]["norms"]["ops"] == 33  # one fused launch per norm
        assert set(hybrid["by_part"]) >= {"mixer: LightningAttention", "mixer: SparseAttention", "mlp", "norms"}
    # past dense_len the sparse layers select blocks: more ops than attending densely, still a few dozen a layer
    sparse = [rows[("hybrid", p)]["by_part"]["mixer: SparseAttention"]["ops"] for p in (300, 2400)]
    assert sparse[0] < sparse[1] <= 4 * 40, sparse
