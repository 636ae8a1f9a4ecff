"""Optional adapter to lm-evaluation-harness: run its tasks by name on a model already in memory.

Needs ``pip install lm_eval[hf]`` and the tasks' data (the hub or a local cache); neither is a salatrain
dependency. The hybrid is passed to lm-eval's ``HFLM`` as a model instance, so layer swaps made in memory
(`salatrain select`) are what gets evaluated.
"""

from __future__ import annotations

import importlib.util

from ..errors import UserError

# The first of these a task reports is its headline number (all higher-is-better).
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "contains", "em", "f1", "score")


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require(tasks: list[str]) -> None:
    if tasks and not available():
        raise UserError(f"lm-eval tasks {tasks} need lm-evaluation-harness: pip install 'lm_eval[hf]'")


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 1) -> dict[str, dict[str, float]]:
    """{task: {metric: value, ..., "primary": value}} for each task (and each subtask lm-eval reports)."""
    require(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    except Exception as e:  # lm-eval raises many types for unknown tasks or unreachable data
        raise UserError(f"lm-eval failed on {tasks}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return {task: _metrics(values) for task, values in out["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    metrics = {}
    for key, v in values.items():
        name, _, filt = key.partition(",")
        if isinstance(v, (int, float)) and not name.endswith("_stderr") and name != "alias":
            metrics[name if filt in ("", "none") else f"{name},{filt}"] = float(v)
    primary = next((metrics[m] for m in PRIMARY_METRICS if m in metrics), None)
    if primary is None and metrics:
        primary = next(iter(metrics.values()))
    if primary is not None:
        metrics["primary"] = primary
    return metrics


def mean_primary(results: dict[str, dict[str, float]], tasks: list[str]) -> float:
    """Mean headline metric over ``tasks`` (a group's subtasks count through the group's own entry)."""
    vals = [results[t]["primary"] for t in tasks if t in results and "primary" in results[t]]
    if not vals:
        raise UserError(f"lm-eval reported no usable metric for {tasks}")
    return sum(vals) / len(vals)
