"""Synthetic probes: deterministic per seed, lengths as asked, answers in the haystack; an oracle scores 100%, a
random model scores near chance; exact match by teacher forcing agrees with greedy generate()."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from salatrain.eval.probes import TASKS, make_samples
from salatrain.eval.scoring import chance, score_sample, summarize
from salatrain.models.loading import load_dense_as_hybrid


@pytest.fixture(scope="module")
def tok(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


class Oracle(torch.nn.Module):
    """Knows every probe sequence and puts all its mass on the true next token."""

    def __init__(self, samples, vocab_size):
        super().__init__()
        self.full = {s.prompt_ids + s.answer_ids for s in samples}
        self.vocab_size = vocab_size

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        ids = tuple(input_ids[0].tolist())
        assert ids in self.full
        logits = torch.zeros(1, len(ids), self.vocab_size)
        logits[0, torch.arange(len(ids) - 1), torch.tensor(ids[1:])] = 30.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.mark.parametrize("task", TASKS)
def test_probes_deterministic_and_within_length(tok, task):
    a = make_samples(tok, task, 1024, 3, seed=7)
    b = make_samples(tok, task, 1024, 3, seed=7)
    c = make_samples(tok, task, 1024, 3, seed=8)
    assert a == b
    assert a != c
    assert len({s.answer for s in a}) > 1  # samples differ from each other
    for s in a:
        assert 1024 - 40 <= s.num_tokens <= 1024  # within one filler sentence / JSON pair of the target
        text = tok.decode(list(s.prompt_ids))
        for word in tok.decode(list(s.answer_ids)).strip().rstrip('"').split():
            assert word in text  # the answer is in the haystack
        assert 0.0 <= s.depth <= 1.0


def test_probe_too_short_is_an_error(tok):
    with pytest.raises(ValueError, match="too short"):
        make_samples(tok, "niah_multikey", 256, 1)


def test_oracle_scores_100_percent(tok):
    samples = [s for t in TASKS for s in make_samples(tok, t, 768, 4, seed=1)]
    oracle = Oracle(samples, len(tok))
    summary = summarize([score_sample(oracle, s) for s in samples])
    for task in TASKS:
        assert summary[task]["768"]["exact_match"] == 1.0
        assert summary[task]["768"]["answer_logprob"] > -1e-6


def test_random_model_near_chance(tiny_lm_dir, tok):
    model = load_dense_as_hybrid(str(tiny_lm_dir))
    samples = [s for t in TASKS for s in make_samples(tok, t, 768, 4, seed=2)]
    summary = summarize([score_sample(model, s) for s in samples])
    ref = chance(model.config.vocab_size)
    for task in TASKS:
        assert summary[task]["768"]["exact_match"] == 0.0
        assert abs(summary[task]["768"]["answer_logprob"] - ref["answer_logprob"]) < 0.5, summary[task]
    assert ref["answer_logprob"] == pytest.approx(-math.log(len(tok)))


def test_teacher_forced_exact_match_equals_greedy_generation(tiny_lm_dir, tok):
    """Answers set to what generate() produces score exact; one changed token makes it fail at that point."""
    model = load_dense_as_hybrid(str(tiny_lm_dir))
    for s in make_samples(tok, "passkey", 256, 3, seed=3):
        with torch.no_grad():
            gen = model.generate(torch.tensor([s.prompt_ids]), max_new_tokens=5, do_sample=False)
        greedy = tuple(gen[0, len(s.prompt_ids):].tolist())
        assert score_sample(model, dataclasses.replace(s, answer_ids=greedy)).exact_match
        for j in range(5):
            wrong = greedy[:j] + ((greedy[j] + 1) % len(tok),) + greedy[j + 1:]
            assert not score_sample(model, dataclasses.replace(s, answer_ids=wrong)).exact_match


@pytest.mark.parametrize("kind", ["dense", "hybrid", "transformers"])
def test_chunked_prefill_gives_the_same_scores(tiny_lm_dir, tiny_aligned_dir, tok, kind):
    from transformers import AutoModelForCausalLM

    from salatrain.eval.scoring import token_losses
    from salatrain.models import SalaHybridForCausalLM

    if kind == "dense":
        model = load_dense_as_hybrid(str(tiny_lm_dir))
    elif kind == "hybrid":
        model = SalaHybridForCausalLM.from_pretrained(tiny_aligned_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    s = make_samples(tok, "passkey", 300, 1, seed=4)[0]
    whole, chunked = score_sample(model, s), score_sample(model, s, chunk_tokens=64)
    assert chunked.answer_logprob == pytest.approx(whole.answer_logprob, abs=1e-4)
    assert chunked.exact_match == whole.exact_match
    ids = torch.tensor([s.prompt_ids])
    assert torch.allclose(token_losses(model, ids, chunk_tokens=100), token_losses(model, ids), atol=1e-4)
