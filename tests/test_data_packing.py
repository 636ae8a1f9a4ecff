"""Data pipeline: packing keeps documents apart (in the rows and inside every mixer), rows are deterministic and
shard cleanly, chat records train on assistant turns only, bad inputs give one-line errors."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from salatrain.data import IGNORE, DataSettings, PackedSequences, build_packed
from salatrain.data.tokenize import encode_chat
from salatrain.errors import UserError
from salatrain.train.tiny import resolve
from tests.helpers.common import one_thread  # noqa: F401 (fixtures)


def _docs(lengths):
    """Document k holds tokens 1000·k + 0, 1, 2, ... so every token names its document and offset."""
    ids = [list(range(1000 * k, 1000 * k + n)) for k, n in enumerate(lengths)]
    return Dataset.from_dict({"input_ids": ids, "loss_mask": [[1] * n for n in lengths], "length": list(lengths)})


def test_rows_never_mix_documents_and_cover_the_stream():
    lengths = [5, 40, 7, 90, 13, 64, 3, 31]
    packed = PackedSequences(_docs(lengths), seq_len=32, seed=3)
    assert packed.rows_per_epoch == sum(lengths) // 32
    stream = []
    for g in range(packed.rows_per_epoch):
        row = packed.row(g)
        ids, pos, labels = row["input_ids"], row["position_ids"], row["labels"]
        starts = np.flatnonzero(pos == 0)
        assert starts[0] == 0
        for s, e in zip(starts, list(starts[1:]) + [len(ids)]):
            seg = ids[s:e]
            assert len(set(seg // 1000)) == 1, "a segment between restarts holds one document"
            assert np.all(np.diff(seg) == 1) and np.array_equal(pos[s:e], np.arange(e - s))
            assert labels[s] == IGNORE and np.array_equal(labels[s + 1 : e], seg[1:])
        stream.extend(ids.tolist())
    order = np.random.default_rng([3, 0]).permutation(len(lengths))
    expected = [t for k in order for t in range(1000 * k, 1000 * k + lengths[k])]
    assert stream == expected[: len(stream)]


def test_rows_read_from_arrow_buffers_equal_rows_read_through_datasets(tmp_path):
    """Documents come straight from the memory-mapped Arrow buffers (several chunks, a sliced chunk whose
    offsets do not start at 0, a dataset loaded from disk, a filtered and a shuffled one, whose rows go through an
    indices mapping); rows equal those read through ``datasets``."""
    from datasets import concatenate_datasets, load_from_disk

    rng = np.random.default_rng(0)
    a = _docs(rng.integers(1, 70, 30).tolist())
    b = _docs(rng.integers(1, 70, 50).tolist()).select(range(7, 41))  # a contiguous slice: no indices mapping
    a.save_to_disk(tmp_path / "a")
    cases = {"chunks": concatenate_datasets([a, b, a]), "disk": load_from_disk(tmp_path / "a"),
             "shuffled": concatenate_datasets([a, b]).shuffle(seed=1),
             "filtered": concatenate_datasets([b, a]).filter(lambda r: r["length"] % 3 != 0)}
    for name, docs in cases.items():
        fast, slow = PackedSequences(docs, seq_len=24, seed=5), PackedSequences(docs, seq_len=24, seed=5)
        slow._columns = None
        assert fast._columns is not None and (fast._columns[0] is None) == (name in ("chunks", "disk")), name
        for g in range(3 * fast.rows_per_epoch):
            x, y = fast.row(g), slow.row(g)
            assert all(np.array_equal(x[k], y[k]) for k in y), (name, g)


def test_rows_are_deterministic_and_epochs_reshuffle():
    a = PackedSequences(_docs([17] * 20), seq_len=16, seed=0)
    b = PackedSequences(_docs([17] * 20), seq_len=16, seed=0)
    w = a.rows_per_epoch
    assert all(np.array_equal(a.row(g)["input_ids"], b.row(g)["input_ids"]) for g in (0, 5, w + 2, 3 * w + 1))
    assert not np.array_equal(a.row(0)["input_ids"], a.row(w)["input_ids"])


@pytest.mark.parametrize("world, accum, micro", [(1, 4, 2), (2, 2, 2), (4, 1, 2), (2, 4, 1)])
def test_ranks_read_disjoint_rows_of_the_same_global_batch(world, accum, micro):
    from salatrain.train.loop import rank_rows

    rows = [g for r in range(world) for m in range(accum) for g in rank_rows(40, m, r, world, micro)]
    assert sorted(rows) == list(range(40, 40 + world * accum * micro))


def test_packed_forward_equals_each_document_alone():
    """Sparse (past dense_len), Lightning and softmax layers see no token of another document."""
    from salatrain.models import SalaHybridForCausalLM

    model = SalaHybridForCausalLM.from_pretrained(resolve("builtin:tiny-hybrid"), dtype=torch.float32).eval()
    assert model.config.sparse_config["dense_len"] < 50
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (50, 70, 120)]
    ids = torch.stack([torch.cat(docs[:2]), docs[2]])
    pos = torch.stack([torch.cat([torch.arange(50), torch.arange(70)]), torch.arange(120)])
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        alone = [model(d[None], use_cache=False).logits[0] for d in docs]
    torch.testing.assert_close(packed[0, :50], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 50:], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], alone[2], atol=1e-5, rtol=1e-5)


def test_chat_targets_are_the_assistant_turns():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-dense"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six, of course."}]
    ids, mask = encode_chat(msgs, tok)
    assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    target = tok.decode([t for t, m in zip(ids, mask) if m])
    assert target == "Four.<|im_end|>\nSix, of course.<|im_end|>\n"


def test_text_and_chat_files_pack_together(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-dense"))
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 30}]}
    (tmp_path / "b.jsonl").write_text(json.dumps(chat) + "\n")
    settings = DataSettings(files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], cache_dir=str(tmp_path / "c"))
    packed = build_packed(settings, tok, seq_len=32)
    assert packed.num_documents == 2
    row = packed.batch([0, 1])
    assert row["input_ids"].shape == (2, 32) and row["labels"].dtype == torch.int64


@pytest.mark.parametrize("case", ["malformed", "empty", "no_text_field", "too_short", "missing"])
def test_bad_data_is_a_one_line_error(tmp_path, case):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-dense"))
    f = tmp_path / "data.jsonl"
    lines = {"malformed": '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', "empty": "",
             "no_text_field": '{"body": "a"}\n', "too_short": '{"text": "tiny"}\n', "missing": None}[case]
    if lines is not None:
        f.write_text(lines)
    with pytest.raises(UserError) as e:
        build_packed(DataSettings(files=[str(f)], cache_dir=str(tmp_path / "c")), tok, seq_len=64)
    msg = str(e.value)
    assert "\n" not in msg
    expected = {"malformed": f"{f}:3: malformed JSON", "empty": "empty", "no_text_field": "neither a 'text'",
                "too_short": "fewer than one sequence", "missing": "does not exist"}[case]
    assert expected in msg
