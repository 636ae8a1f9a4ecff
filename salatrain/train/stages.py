"""What each loss trains, as modules DeepSpeed wraps: ``forward(input_ids, position_ids, labels)`` returns
(sum of the loss over this micro-batch's targets, detached statistics). A sequence shard (sequence
parallelism) comes with ``shift_labels`` (each position's own target) instead of ``labels``. Every stage keeps
the trained model under ``.student`` with the hybrid's parameter names; a frozen teacher is held outside the
module tree (it is placed, or sharded under ZeRO-3, separately) and never trained.

    AlignStage   loss mse_align: one Lightning layer per attention layer of the dense teacher, fed the
                 teacher's own input to that layer (the input_layernorm output, its RoPE and document
                 layout), regressing that layer's attention output; all layers in one teacher forward
    DistillStage loss kl: KL(teacher ‖ student) on next-token distributions, chunked
    LMStage      loss lm: next-token cross-entropy, chunked

Stages are data for the loop (``STAGES[cfg.stage.loss]``, built by :func:`build_stage`): each gives
``tokenizer_dir(paths)``, ``config`` (the hybrid config of what it trains: written into checkpoints),
``base`` (the dense base it aligns to, or None), ``trainable(cfg)`` (parameter-name patterns),
``flops_per_token(seq_len, sparse_on)``, ``count(batch)`` and ``reports(stats)`` (extra report files at the
end), so the loop never asks which kind of stage it runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..data import IGNORE, num_targets
from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from ..models import SalaHybridConfig, SalaHybridForCausalLM
from ..models.loading import dense_config, load_dense_as_hybrid
from ..models.modeling_sala_hybrid import LightningAttention, SparseAttention
from .profile import phase

log = logging.getLogger(__name__)
NO_SPARSE = 1 << 62  # dense_len that keeps every query dense


def load_model(path: str, dtype: torch.dtype = torch.float32) -> SalaHybridForCausalLM:
    """A hybrid checkpoint as is, or a dense one (any supported family) with every layer full_attention, on CPU
    with parameters in ``dtype`` (buffers such as RoPE frequencies and Lightning decays stay fp32)."""
    ckpt = CheckpointDir(path)
    if ckpt.model_type == SalaHybridConfig.model_type:
        try:
            return SalaHybridForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
        except ValueError as e:  # its config.json (mixer types, sparse geometry, ...) does not hold together
            raise UserError(f"{ckpt.path}: {str(e).splitlines()[0]}") from None
    return _load_dense(ckpt, dtype)


def _load_dense(ckpt: CheckpointDir, dtype: torch.dtype) -> SalaHybridForCausalLM:
    try:
        return load_dense_as_hybrid(ckpt, dtype=dtype)
    except ValueError as e:  # keys that do not match the family's layout: the user's checkpoint
        raise UserError(str(e)) from None


def disable_sparse(model: nn.Module) -> None:
    """Sparse layers attend densely at every position (dense_len = ∞); ``model.config`` keeps its dense_len,
    so a checkpoint exported afterwards selects blocks as before."""
    for m in model.modules():
        if isinstance(m, SparseAttention):
            m.sparse_params["dense_len"] = NO_SPARSE


def warn_rope(config: SalaHybridConfig, seq_len: int, what: str) -> None:
    full = [i for i, m in enumerate(config.mixer_types) if m == "full_attention"]
    trained = (config.rope_parameters or {}).get("original_max_position_embeddings") or config.max_position_embeddings
    if full and seq_len > trained:
        log.warning("trainer.seq_len=%d exceeds the %d positions the RoPE of %s's full_attention layers %s was "
                    "trained for; expect degraded quality unless its RoPE is scaled", seq_len, trained, what, full)


def enable_activation_checkpointing(model: SalaHybridForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass (transformers >= 5.2x renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def head_of(model: SalaHybridForCausalLM):
    from .losses import Head

    return Head(model.lm_head, float(model.config.logit_scale))


def predicting(h_BTH: torch.Tensor, labels_BT, shift_labels_BT) -> torch.Tensor:
    """The positions that can predict a next token: all of a shard's, all but the last of a whole row's."""
    return h_BTH if shift_labels_BT is not None else h_BTH[:, :-1]


def targets(h_BTH: torch.Tensor, labels_BT: torch.Tensor | None, shift_labels_BT: torch.Tensor | None = None,
            target_index: torch.Tensor | None = None, target: torch.Tensor | None = None):
    """Hidden states at positions whose next token is a target: (h [M, H], target [M], pick) where ``pick(x)``
    takes the same positions of another model's hidden states [B, T, H]. ``labels`` [B, T] are the row's own
    tokens (position i predicts labels[i + 1]); ``shift_labels`` [B, T] already hold each position's target.
    ``target_index`` / ``target`` (:func:`salatrain.data.packed_layout`, built on the host): the positions in
    the flattened [B·T] rows and their targets; without them a boolean mask picks the positions (a host read)."""
    if target_index is not None:
        def pick(x):
            return x.reshape(-1, x.shape[-1]).index_select(0, target_index)

        return pick(h_BTH), target, pick
    shifted = shift_labels_BT if shift_labels_BT is not None else labels_BT[:, 1:]
    mask = shifted != IGNORE

    def pick(x):
        return predicting(x, labels_BT, shift_labels_BT)[mask]

    return pick(h_BTH), shifted[mask], pick


def model_inputs(input_ids, position_ids, cu_seqlens=None, max_seqlen=None) -> dict:
    """Keyword arguments of a model's forward over a micro-batch (with its host-built document layout, if any)."""
    kw = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if cu_seqlens is not None:
        kw.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return kw


def count_targets(batch: dict) -> int:
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE).sum())
    return num_targets(batch["labels"])


class Stage(nn.Module):
    """A stage that trains a whole hybrid model (``student``), optionally against a frozen teacher."""

    base: CheckpointDir | None = None

    def __init__(self, student: SalaHybridForCausalLM):
        super().__init__()
        self.student = student
        self._teacher: list[SalaHybridForCausalLM] = []  # a list keeps it out of the module tree

    @staticmethod
    def tokenizer_dir(paths: dict) -> str:
        return paths["model"]

    @property
    def config(self) -> SalaHybridConfig:
        return self.student.config

    @property
    def teacher(self) -> SalaHybridForCausalLM | None:
        return self._teacher[0] if self._teacher else None

    def trainable(self, cfg) -> list[str]:
        return list(cfg.stage.trainable)

    def count(self, batch: dict) -> int:
        return count_targets(batch)

    def flops_per_token(self, seq_len: int, sparse_on: bool, teacher: SalaHybridForCausalLM | None) -> float:
        from .flops import train_flops_per_token

        return train_flops_per_token(self.student, self.config, seq_len, sparse_on, teacher,
                                     teacher.config if teacher is not None else None)

    def reports(self, stats) -> dict[str, dict]:
        """Report files written at the end of the stage ({file name: content}); ``stats()`` sums this stage's
        statistics over the global batch after the last training rows, without gradients."""
        return {}


class LMStage(Stage):
    def __init__(self, student: SalaHybridForCausalLM, chunk: int):
        super().__init__(student)
        self.chunk = chunk

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None, cu_seqlens=None, max_seqlen=None,
                target_index=None, target=None):
        with phase("student"):
            h = self.student.model(**model_inputs(input_ids, position_ids, cu_seqlens, max_seqlen)).last_hidden_state
        from .losses import chunked_cross_entropy

        with phase("loss"):
            h_M, t_M, _ = targets(h, labels, shift_labels, target_index, target)
            return chunked_cross_entropy(h_M, t_M, head_of(self.student), self.chunk), {}


class DistillStage(Stage):
    def __init__(self, student: SalaHybridForCausalLM, chunk: int, temperature: float):
        super().__init__(student)
        self.chunk, self.temperature = chunk, temperature

    def attach_teacher(self, teacher: SalaHybridForCausalLM) -> None:
        if teacher.config.vocab_size != self.student.config.vocab_size:
            raise ValueError(f"teacher vocabulary {teacher.config.vocab_size} != student vocabulary "
                             f"{self.student.config.vocab_size}")
        self._teacher[:] = [teacher]

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None, cu_seqlens=None, max_seqlen=None,
                target_index=None, target=None):
        from .losses import chunked_kl

        teacher = self._teacher[0]
        inputs = model_inputs(input_ids, position_ids, cu_seqlens, max_seqlen)
        with phase("student"):
            h = self.student.model(**inputs).last_hidden_state
        with phase("teacher"), torch.no_grad():
            ht = teacher.model(**inputs).last_hidden_state
        with phase("loss"):
            hs_M, t_M, pick = targets(h, labels, shift_labels, target_index, target)
            ht_M = pick(ht)
            kl, ce = chunked_kl(hs_M, ht_M, t_M, head_of(self.student), head_of(teacher), self.chunk,
                                self.temperature)
        return kl, {"kl": kl.detach(), "lm_loss": ce}


class _Attn(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.self_attn = attn


class AlignStage(nn.Module):
    """``student.model.layers[i].self_attn`` is layer i's Lightning replacement (names as in the hybrid)."""

    def __init__(self, teacher: SalaHybridForCausalLM, base: CheckpointDir):
        super().__init__()
        from ..convert.transfer import transfer_attention

        n = teacher.config.num_hidden_layers
        self.base = base
        self.hybrid_config = dense_config(base, mixer_types=["linear_attention"] * n)
        layers = []
        for i, layer in enumerate(teacher.model.layers):
            attn = LightningAttention(self.hybrid_config, i)
            dense = {k: v.detach().float() for k, v in layer.self_attn.state_dict().items()}
            attn.load_state_dict(transfer_attention("linear_attention", dense, self.hybrid_config))
            layers.append(_Attn(attn))
        self.student = nn.Module()
        self.student.model = nn.Module()
        self.student.model.layers = nn.ModuleList(layers)
        self._teacher: list[SalaHybridForCausalLM] = []
        self._captured: dict[int, tuple] = {}
        self._hooks: list = []

    def attach_teacher(self, teacher: SalaHybridForCausalLM) -> None:
        for h in self._hooks:
            h.remove()
        self._teacher[:] = [teacher]
        self._hooks = [layer.self_attn.register_forward_hook(self._capture(i))
                       for i, layer in enumerate(teacher.model.layers)]

    def _capture(self, i: int):
        def hook(module, args, output):
            self._captured[i] = (args[0], args[1], args[2], output)

        return hook

    @staticmethod
    def tokenizer_dir(paths: dict) -> str:
        return paths["teacher"] or paths["model"]

    @property
    def config(self) -> SalaHybridConfig:
        return self.hybrid_config

    @property
    def teacher(self) -> SalaHybridForCausalLM | None:
        return self._teacher[0] if self._teacher else None

    def trainable(self, cfg) -> list[str]:
        return ["all"]  # every Lightning replacement

    def count(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def flops_per_token(self, seq_len: int, sparse_on: bool, teacher: SalaHybridForCausalLM | None) -> float:
        from .flops import train_flops_per_token

        return train_flops_per_token(self.student, self.hybrid_config, seq_len, sparse_on, teacher.model,
                                     teacher.config)

    def reports(self, stats) -> dict[str, dict]:
        """align_report.json: per-layer MSE of the aligned layers on the global batch after the training rows."""
        total, tokens, state = stats()
        per_layer = (total["layer_mse"] / tokens).tolist()
        return {"align_report.json": {
            "base_fingerprint": self.base.fingerprint(), "base": str(self.base.path), "per_layer_mse": per_layer,
            "tokens": state.tokens, "steps": state.step, "seq_len": state.seq_len, "eval_tokens": tokens,
            "mse": "mean over tokens and hidden units of (lightning - teacher attention output)^2, on the rows "
                   "after the training rows"}}

    def forward(self, input_ids, position_ids, labels=None, shift_labels=None, cu_seqlens=None, max_seqlen=None,
                target_index=None, target=None):
        self._captured.clear()
        with phase("teacher"), torch.no_grad():
            self._teacher[0].model(**model_inputs(input_ids, position_ids, cu_seqlens, max_seqlen))
        per_layer = []
        with phase("student"):
            for i, layer in enumerate(self.student.model.layers):
                x, rope, seq, target = self._captured[i]
                out = layer.self_attn(x, rope, seq, None)
                per_layer.append((out.float() - target.float()).pow(2).mean(-1).sum())
        self._captured.clear()
        per_layer = torch.stack(per_layer)
        return per_layer.sum(), {"layer_mse": per_layer.detach()}


STAGES = {"mse_align": AlignStage, "kl": DistillStage, "lm": LMStage}


def build_stage(cfg, paths: dict, dtype: torch.dtype, fuse: bool, main: bool = True):
    """The stage ``cfg.stage.loss`` names, with its models loaded on CPU: (stage, frozen teacher or None).
    ``main``: this rank says the warnings."""
    from ..models.modeling_sala_hybrid import set_fused_elementwise

    set_fused_elementwise(fuse)
    seq_len, backend = cfg.trainer.seq_len, cfg.model.kernel_backend
    if cfg.stage.loss == "mse_align":
        base = CheckpointDir(AlignStage.tokenizer_dir(paths), what="base model")
        if base.model_type == SalaHybridConfig.model_type:
            raise UserError(f"align needs the dense base model, got the hybrid checkpoint {base.path}")
        teacher = load_model(str(base.path), dtype)
        stage = AlignStage(teacher, base)
    else:
        student = load_model(paths["model"], dtype)
        student.set_kernel_backend(backend)
        if not cfg.stage.sparse_attention:
            disable_sparse(student)
        if cfg.trainer.activation_checkpointing:
            enable_activation_checkpointing(student)
        if main:
            warn_rope(student.config, seq_len, "the student")
        teacher = load_model(paths["teacher"], dtype) if cfg.stage.loss == "kl" else None
        stage = (DistillStage(student, cfg.trainer.loss_chunk_tokens, cfg.stage.kl_temperature) if teacher is not None
                 else LMStage(student, cfg.trainer.loss_chunk_tokens))
        stage.train()
    if teacher is not None:
        teacher.set_kernel_backend(backend)
        if main:
            warn_rope(teacher.config, seq_len, "the teacher")
        if not cfg.stage.sparse_attention:
            disable_sparse(teacher)
    return stage, teacher
