"""bench/train_bench.py's report of the SUITE=longest search: the longest row that trained on 1 GPU and on 2, and
the first longer length that did not (out of memory is a row, not the end of the search)."""
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(monkeypatch):
    monkeypatch.setitem(os.environ, "SUITE", "longest")
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "bench" / "train_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_longest_row_per_gpu_count(monkeypatch):
    tb = _bench(monkeypatch)
    spec = tb.SIZES["full"]
    ok = dict(status="ok", tokens_per_s=40000.0, mem_gb=30.0)
    done = {tb.key(("hybrid", "lm", 2, "xlong_half", 1)): ok,
            tb.key(("hybrid", "lm", 2, "xlong", 1)): dict(ok, tokens_per_s=30000.0, mem_gb=55.5),
            tb.key(("hybrid", "lm", 2, "x256k", 1)): dict(status="OOM"),
            tb.key(("hybrid", "lm", 2, "xlong", 2, 2)): dict(status="OOM")}
    lines = tb.longest_lines(done, spec)
    assert "- 1 GPU: longest row that trained 128K (30,000 tokens/s, peak 55.5 GB per GPU); 256K: OOM" in lines
    assert "- 2 GPUs (SP 2): no length trained (from 128K: OOM)" in lines
    assert tb._seq(spec, ("hybrid", "lm", 2, "x1m", 2, 2)) == "1M"
    assert tb._seq(tb.SIZES["small"], ("hybrid", "lm", 2, "x256k", 2, 2)) == "1536"
    assert [c for c in tb.configs() if tb.sp_of(c) == 2][-1][3] == "x1m"
