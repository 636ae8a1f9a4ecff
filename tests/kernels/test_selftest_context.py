"""The kernels' start-up self-test runs outside the caller's autograd context.

A model's first forward on a fresh process runs each kernel's self-test (its own forward and backward). It
must work whatever the caller's context is: ``torch.no_grad()``, ``torch.inference_mode()`` (``generate``), or
a layer under activation checkpointing, whose recomputation must save exactly what its first forward saved.
On CPU the model takes the Triton path when forced (``kernel_backend="triton"``) under Triton's interpreter,
so these run the real dispatch, self-tests included; on a GPU the same tests run the compiled kernels.
"""

import functools

import pytest
import torch

from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM
from salatrain.models import modeling_sala_hybrid as modeling
from salatrain.models.modeling_sala_hybrid import run_isolated

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# block geometry the Triton kernels take; dense_len below the prompt so the sparse path really runs
SPARSE = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, topk=2, window_size=16, dense_len=32)
PLAN = ["sparse_attention", "linear_attention", "linear_attention"]


def _backward_inside(x):
    """What a self-test does: a forward and a backward of its own."""
    w = torch.randn(3, requires_grad=True)
    (w * x).sum().backward()
    return w.grad.clone(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_run_isolated_has_its_own_autograd_context(context):
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    x = torch.arange(3.0)
    with ctx:
        with pytest.raises(RuntimeError):  # what the self-test hit before: no graph in the caller's context
            _backward_inside(x)
        grad, grad_mode, inference = run_isolated(_backward_inside, x)
        assert torch.is_grad_enabled() is False  # the caller's mode is untouched
    assert torch.equal(grad, x) and grad_mode and not inference


def test_run_isolated_reraises_in_the_caller():
    def boom():
        raise ValueError("kernel disagrees")

    with pytest.raises(ValueError, match="kernel disagrees"):
        run_isolated(boom)


def test_run_isolated_inside_a_checkpointed_region_saves_nothing_extra():
    calls = []
    lin = torch.nn.Linear(4, 4)

    def fn(x):
        if not calls:  # first forward only, as a cached self-test
            calls.append(run_isolated(_backward_inside, torch.ones(3)))
        return lin(x).tanh()

    x = torch.randn(2, 4, requires_grad=True)
    torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False).sum().backward()  # CheckpointError otherwise
    assert x.grad is not None and len(calls) == 1


def _tiny(backend: str, seed: int = 0) -> SalaHybridForCausalLM:
    torch.manual_seed(seed)
    cfg = SalaHybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=len(PLAN),
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, mixer_types=PLAN,
                           sparse_config=SPARSE, max_position_embeddings=256, eos_token_id=None, bos_token_id=None)
    model = SalaHybridForCausalLM(cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "g_proj" in name or "z_proj" in name:
                p.normal_(0, 0.2)
    model.set_kernel_backend(backend)
    return model


@pytest.fixture
def fresh_process(monkeypatch):
    """As in a new process: no kernel has passed its self-test yet. Under the interpreter the Lightning
    self-test runs on 72 tokens (two chunks) instead of 200, to keep this quick."""
    monkeypatch.setattr(modeling, "_checked", {})
    if DEVICE == "cpu":
        monkeypatch.setattr(modeling._kernels, "self_test", functools.partial(modeling._kernels.self_test, seq_len=72))
    yield
    assert any(k[0] == "lightning_attn" for k in modeling._checked), "the self-test never ran"


def _ids(t=40, seed=0):
    return torch.randint(0, 64, (1, t), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_first_forward_under_no_grad_or_inference_mode(fresh_process, context):
    model = _tiny("triton").eval()
    ref = _tiny("torch").eval()
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        out = model(_ids(), use_cache=False).logits
        expected = ref(_ids(), use_cache=False).logits
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-3)


def test_first_generate(fresh_process):
    model = _tiny("triton").eval()
    ref = _tiny("torch").eval()
    ids = _ids(36)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_first_training_step_with_activation_checkpointing(fresh_process):
    from salatrain.train.stages import enable_activation_checkpointing

    grads = {}
    for backend in ("triton", "torch"):
        model = _tiny(backend).train()
        enable_activation_checkpointing(model)
        model(_ids(), labels=_ids(), use_cache=False).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys() and len(grads["torch"]) > 10
    for name, g in grads["torch"].items():
        assert torch.allclose(grads["triton"][name], g, atol=1e-3, rtol=1e-2), name
