"""Dense HF checkpoint + layer plan → hybrid HF checkpoint + ``conversion_report.json``.

Tensors stream from the source one layer at a time into safetensors shards, so converting needs about one
shard plus one layer of memory (the optional KL check loads both models and is skipped when they don't fit).
The output directory appears only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.schema import ConvertConfig, PlanSettings
from ..errors import UserError
from ..config.ranges import check_ranges
from ..hf_checkpoint import TOKENIZER_FILES, CheckpointDir, ShardWriter, copy_side_files, parse_size
from ..models import SalaHybridConfig, SalaHybridForCausalLM
from ..models.families import family_for
from ..models.export import write_model_code
from ..models.configuration_sala_hybrid import SPARSE_DEFAULTS, default_share_tokens, sparse_config_problem
from ..models.plan import plan_from_file, plan_from_sparse_layers, uniform_layers
from ..rundir import OutputDir
from . import minicpm_sala as released
from .transfer import check_retarget, init_notes, meta_shapes, retarget_attention

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_plan(plan: PlanSettings, num_layers: int, own: list[str] | None = None) -> list[str]:
    """The layer plan the settings choose; ``own``: the source's own mix (a hybrid checkpoint), kept when no plan
    key is given."""
    chosen = [name for name, v in (("file", plan.file), ("sparse_layers", plan.sparse_layers), ("method", plan.method))
              if v is not None]
    if not chosen and own is not None:
        return list(own)
    if len(chosen) != 1:
        raise UserError(
            "choose the layer plan with exactly one of plan.file=<layer_plan.json>, plan.sparse_layers=[...] or "
            f"plan.method=uniform (got {', '.join(chosen) or 'none'})"
        )
    try:
        if plan.file is not None:
            return plan_from_file(plan.file, num_layers)
        if plan.sparse_layers is not None:
            return plan_from_sparse_layers(num_layers, list(plan.sparse_layers))
        if plan.method != "uniform":
            raise ValueError(f"plan.method must be 'uniform' here (got {plan.method!r}); `salatrain select` offers "
                             "the other methods and writes a plan file")
        return plan_from_sparse_layers(num_layers, uniform_layers(num_layers, plan.ratio))
    except ValueError as e:
        raise UserError(str(e)) from None


def hybrid_config(src: CheckpointDir, mixer_types: list[str] | None, sparse=None, lightning=None) -> SalaHybridConfig:
    """The hybrid config for a checkpoint (``mixer_types=None``: the source's own mix, every layer full_attention
    for a dense base). ``sparse``/``lightning`` settings left unset keep the source's (a MiniCPM-SALA checkpoint's)
    or salatrain's defaults."""
    try:
        family = family_for(src.model_type)
        kw = family.hybrid_config_kwargs(src.config)
    except ValueError as e:
        raise UserError(f"{src.path}: {e}") from None
    if mixer_types is not None:
        kw["mixer_types"] = mixer_types
    if sparse is not None:  # a new conversion: unset share_tokens follows the list length
        sc = kw["sparse_config"] = {**kw.get("sparse_config", {}), **_set_fields(sparse)}
        sc.setdefault("share_tokens", default_share_tokens(sc.get("topk", SPARSE_DEFAULTS["topk"])))
    if lightning is not None:
        kw["lightning_config"] = {**kw.get("lightning_config", {}), **_set_fields(lightning)}
    try:
        return SalaHybridConfig(**kw)
    except ValueError as e:
        raise UserError(f"{src.path}: {str(e).splitlines()[0]}") from None


def _set_fields(settings) -> dict:
    return {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}


def check_source_keys(src: CheckpointDir, dense_cfg: SalaHybridConfig) -> None:
    """Every key mapped or explicitly dropped, every shape as the config says; otherwise a clear error naming the
    checkpoint's keys."""
    family = family_for(src.model_type)
    expected = meta_shapes(dense_cfg)
    found = {family.hybrid_key(k): (k, shape) for k, shape in src.shapes().items()}
    unknown = [k for h, (k, _) in found.items() if h not in expected and not family.is_dropped(k)
               and not (h == "lm_head.weight" and dense_cfg.tie_word_embeddings)]
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"{src.path}: checkpoint key(s) not understood by the {family.name} adapter: "
                        f"{unknown[:3]}{more}")
    missing = [family.source_key(k) for k in expected if k not in found]
    if missing:
        raise UserError(f"{src.path}: checkpoint lacks {len(missing)} expected key(s), e.g. {missing[:3]}")
    for h, shape in expected.items():
        k, got = found[h]
        if tuple(got) != shape:
            raise UserError(f"{src.path}: {k} has shape {list(got)}, config.json implies {list(shape)}")


def validate(cfg: ConvertConfig) -> OutputDir:
    """Every check that needs no weights (settings, output_dir against the inputs); returns the output dir."""
    if not cfg.model:
        raise UserError("missing model=<dense HF checkpoint dir>")
    out = OutputDir(cfg.output_dir, "convert", overwrite=cfg.overwrite)
    check_ranges(cfg)
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)} (got {cfg.dtype!r})")
    released.check_format(cfg.format)
    try:
        if parse_size(cfg.max_shard_size) < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"max_shard_size must be a positive size such as 5GB or 500MB (got {cfg.max_shard_size!r})"
                        ) from None
    own = {**SPARSE_DEFAULTS, **_source_sparse(cfg.model)}  # what unset sparse.* keys stand for
    problem = sparse_config_problem({**own, **_set_fields(cfg.sparse)})
    if problem and not sparse_config_problem(own):  # the source's own fault is named with its path later
        raise UserError(problem.replace("sparse_config ", "sparse."))
    out.check({"model": cfg.model, "plan.file": cfg.plan.file, "aligned": cfg.aligned})
    return out


def _source_sparse(model: str) -> dict:
    """The sparse settings of the source's config.json (a MiniCPM-SALA checkpoint's own; the weights are not read),
    {} when it has none or cannot be read here (the conversion then says why)."""
    try:
        hf = json.loads((Path(model).expanduser() / "config.json").read_text())
        return dict(family_for(hf.get("model_type")).hybrid_config_kwargs(hf).get("sparse_config") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def ignored_keys(cfg: ConvertConfig) -> dict[str, str]:
    """Keys this conversion does not use (setting one is an error)."""
    out = {}
    if cfg.plan.method != "uniform":
        out["plan.ratio"] = "unless plan.method=uniform (the plan comes from plan.file or plan.sparse_layers)"
    if not cfg.kl_check:
        out["kl_check_tokens"] = "with kl_check=false"
    return out


def convert(cfg: ConvertConfig) -> Path:
    """Run the conversion described by ``cfg``; returns the output directory."""
    out = validate(cfg)
    with out:
        return _convert(cfg, out)


def _convert(cfg: ConvertConfig, out: OutputDir) -> Path:
    t0 = time.time()
    src = CheckpointDir(cfg.model, allow_pickle=cfg.allow_pickle)
    dense_cfg = hybrid_config(src, None)
    hybrid_source = family_for(src.model_type).hybrid
    plan = resolve_plan(cfg.plan, dense_cfg.num_hidden_layers, dense_cfg.mixer_types if hybrid_source else None)
    hcfg = hybrid_config(src, plan, cfg.sparse, cfg.lightning)
    check_source_keys(src, dense_cfg)
    check_retarget(dense_cfg.mixer_types, plan)
    if cfg.aligned and hybrid_source:
        raise UserError(f"aligned= takes the align output of a dense base model; {src.path} is already a hybrid")
    aligned = _open_aligned(cfg.aligned, src, hcfg) if cfg.aligned else None
    if cfg.format == "minicpm_sala":
        released.check_released(hcfg)
    targets = meta_shapes(hcfg)
    with out.atomic() as final:
        # the minicpm_sala format is written from a complete salatrain-format conversion (checked by the KL check)
        tmp = final if cfg.format == "salatrain" else final / ".salatrain"
        tmp.mkdir(exist_ok=True)
        writer = ShardWriter(tmp, parse_size(cfg.max_shard_size))
        with src.reader() as reader, (aligned.reader() if aligned else contextlib.nullcontext()) as aligned_reader:
            _stream(reader, aligned_reader, hcfg, targets, writer, DTYPES.get(cfg.dtype), dense_cfg.mixer_types)
        shards = writer.finish()
        save_config(hcfg, tmp, dtype=cfg.dtype if cfg.dtype != "auto" else _stored_dtype(src))
        side = copy_side_files(src.path, tmp)
        if not set(side) & set(TOKENIZER_FILES):
            log.warning("%s has no tokenizer files, so neither does the hybrid; copy them into %s before eval or "
                        "train", src.path, out.path)
        report = _report(cfg, src, dense_cfg, hcfg, plan, targets, shards, side, t0)
        report["kl_check"] = kl_check(src, tmp, cfg.kl_check_tokens) if cfg.kl_check else {"skipped": "kl_check=false"}
        if cfg.format == "minicpm_sala":
            released.export_hf_dir(tmp, final, max_shard_size=cfg.max_shard_size)
            report["format"] = {"name": "minicpm_sala", "selection_rules_changed": released.rule_changes(hcfg)}
            shutil.rmtree(tmp)
        report["seconds"] = round(time.time() - t0, 1)
        (final / "conversion_report.json").write_text(json.dumps(report, indent=2))
    return out.path


def _stream(reader, aligned_reader, hcfg, targets, writer, dtype, source_mixers):
    layer_of = {}
    for key in targets:
        parts = key.split(".")
        layer_of[key] = int(parts[2]) if key.startswith("model.layers.") else None
    by_layer: dict = {}
    for key, layer in layer_of.items():
        by_layer.setdefault(layer, []).append(key)
    order = [None] + list(range(hcfg.num_hidden_layers))
    for layer in tqdm(order, desc="convert", unit="layer", disable=None):  # no bar when stderr is not a terminal
        keys = by_layer.get(layer, [])
        if layer is None:
            family = family_for(reader.ckpt.model_type)
            tensors = {k: reader.get(family.source_key(k)) for k in keys}
        else:
            tensors = _layer_tensors(reader, aligned_reader, hcfg, layer, keys, source_mixers[layer])
        for key in keys:
            t = tensors[key]
            if tuple(t.shape) != targets[key]:
                raise AssertionError(f"{key}: produced {tuple(t.shape)}, expected {targets[key]}")
            writer.add(key, t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def _layer_tensors(reader, aligned_reader, hcfg, layer, keys, source_mixer):
    prefix = f"model.layers.{layer}."
    attn_prefix = prefix + "self_attn."
    mixer = hcfg.mixer_types[layer]
    family = family_for(reader.ckpt.model_type)
    out = {k: reader.get(family.source_key(k)) for k in keys if not k.startswith(attn_prefix)}
    if mixer == "linear_attention" and aligned_reader is not None:
        new = {k[len(attn_prefix):]: aligned_reader.get(k) for k in aligned_reader.ckpt.key_files()
               if k.startswith(attn_prefix)}
    else:
        dense_keys = [k for k in reader.ckpt.key_files() if k.startswith(attn_prefix) and not family.is_dropped(k)]
        dense = {family.hybrid_key(k)[len(attn_prefix):]: reader.get(k) for k in dense_keys}
        new = retarget_attention(source_mixer, mixer, dense, hcfg)
    out.update({attn_prefix + k: v for k, v in new.items()})
    return out


def _open_aligned(path, src: CheckpointDir, hcfg: SalaHybridConfig) -> CheckpointDir:
    aligned = CheckpointDir(path, what="aligned")
    report = aligned.path / "align_report.json"
    if report.is_file():
        try:
            fp = json.loads(report.read_text()).get("base_fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{report} is corrupt (not a JSON object)") from None
        if fp and fp != src.fingerprint():
            raise UserError(f"aligned checkpoint {aligned.path} was aligned from a different base model than "
                            f"{src.path} (fingerprint {fp} != {src.fingerprint()})")
    mt = aligned.config.get("mixer_types") or []
    if len(mt) != hcfg.num_hidden_layers or any(m != "linear_attention" for m in mt):
        raise UserError(f"{aligned.path} is not an align output (expected every layer linear_attention)")
    return aligned


def _stored_dtype(src: CheckpointDir) -> str:
    d = src.config.get("dtype") or src.config.get("torch_dtype") or "float32"
    return d if d in DTYPES else "float32"


def save_config(hcfg: SalaHybridConfig, out: Path, dtype: str) -> None:
    """config.json with ``auto_map`` plus the modeling files, so ``trust_remote_code`` loads it anywhere."""
    hcfg = SalaHybridConfig(**{**hcfg.to_dict(), "dtype": dtype})
    write_model_code(hcfg, out)


def _report(cfg, src, dense_cfg, hcfg, plan, targets, shards, side, t0):
    dense = meta_shapes(dense_cfg)
    n_dense = sum(_numel(s) for s in dense.values())
    n_hybrid = sum(_numel(s) for s in targets.values())
    return {
        "source": str(src.path),
        "source_fingerprint": src.fingerprint(),
        "family": hcfg.base_model_type,
        "mixer_types": plan,
        "sparse_layers": [i for i, m in enumerate(plan) if m == "sparse_attention"],
        "linear_layers": [i for i, m in enumerate(plan) if m == "linear_attention"],
        "aligned": cfg.aligned,
        "parameters": {"dense": n_dense, "hybrid": n_hybrid, "added": n_hybrid - n_dense},
        "initialisation": init_notes(dense_cfg.mixer_types, plan),
        "sparse_config": hcfg.sparse_config,
        "lightning_config": hcfg.lightning_config,
        "shards": shards,
        "side_files": side,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def kl_check(src: CheckpointDir, hybrid_dir: Path, num_tokens: int, num_seqs: int = 4) -> dict:
    """Mean per-token KL(dense ‖ hybrid) of next-token distributions on a few short sequences: passages of the
    Python documentation through the model's tokenizer when it has one, else random token ids."""
    import psutil

    need = 2 * sum(f.stat().st_size for f in src.weight_files or src.pickle_files) * 2.5
    avail = psutil.virtual_memory().available
    if need > avail:
        return {"skipped": f"two models need ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"}
    from ..models.loading import load_dense_as_hybrid

    dense = load_dense_as_hybrid(src).eval()
    hybrid = SalaHybridForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    ids, inputs = _kl_inputs(src, dense.config.vocab_size, num_tokens, num_seqs)
    with torch.no_grad():
        p = torch.log_softmax(dense(ids, use_cache=False).logits.float(), -1)
        q = torch.log_softmax(hybrid(ids, use_cache=False).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "sequences": ids.shape[0],
            "tokens": ids.shape[1], "inputs": inputs}


def _kl_inputs(src: CheckpointDir, vocab: int, num_tokens: int, num_seqs: int):
    if (src.path / "tokenizer.json").is_file() or (src.path / "tokenizer_config.json").is_file():
        try:
            from pydoc_data.topics import topics
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(src.path)
            rows = []
            for name in sorted(topics)[:64]:
                ids = tok(topics[name], add_special_tokens=False)["input_ids"]
                if len(ids) >= num_tokens:
                    rows.append(ids[:num_tokens])
                if len(rows) == num_seqs:
                    return torch.tensor(rows), "Python documentation passages (pydoc_data.topics)"
        except Exception as e:  # a tokenizer we cannot load: fall back to random ids
            log.warning("KL check: tokenizer unusable (%s); using random token ids", e)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (num_seqs, num_tokens), generator=g), "uniform random token ids, seed 0"
