#!/usr/bin/env bash
# Reruns every measurement behind benchmarks/RESULTS.md, then writes the page and the README's
# pictures. About an hour on a 2-core CPU; run it on an otherwise idle machine.
#
#   bash benchmarks/run.sh            (from the repository root; builds .venv if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p benchmarks/results docs
STORIES=../shared/models/stories260K/stories260K.bin
OUT=benchmarks/results
: > "$OUT/commands.txt"

run() {  # run NAME COMMAND...: stdout to $OUT/NAME.json, the command line to commands.txt
    local name=$1 line="" arg; shift
    for arg in "$@"; do  # quoted where needed, so that the page's commands can be pasted
        if [[ $arg == *" "* ]]; then line+="\"$arg\" "; else line+="$arg "; fi
    done
    echo "$name: ${line% }" >> "$OUT/commands.txt"
    echo "== $name" >&2
    "$@" > "$OUT/$name.json"
}

run gpt2_decode kvgen bench --shape gpt2 --batch 1 --batch 8 --prompt-len 32 --new-tokens 128 \
    --repeats 5 --engine "kvgen cache" --engine "kvgen cache compiled" \
    --engine "transformers cache" --json
run stories260k kvgen bench --model "$STORIES" --prompt-len 8 --new-tokens 256 --threads 1 \
    --repeats 5 --engine "kvgen cache" --engine "kvgen cache compiled" \
    --engine "transformers cache" --json
run gpt2_prefill512 kvgen bench --shape gpt2 --prompt-len 512 --new-tokens 4 --repeats 5 \
    --engine "kvgen cache" --engine "transformers cache" --json
run gpt2_uncached256 kvgen bench --shape gpt2 --prompt-len 32 --new-tokens 256 --repeats 1 \
    --engine "kvgen cache" --engine "kvgen no-cache" --json --plot docs/step_latency.png
run gpt2_uncached256_b16 kvgen bench --shape gpt2 --batch 16 --prompt-len 32 --new-tokens 256 \
    --repeats 3 --engine "kvgen cache" --engine "kvgen no-cache" --json
echo "engine: python benchmarks/engine_bench.py --json $OUT/engine.json" >> "$OUT/commands.txt"
python benchmarks/engine_bench.py --json "$OUT/engine.json"
echo "matvec_routes: python benchmarks/matvec_routes.py --json $OUT/matvec_routes.json" \
    >> "$OUT/commands.txt"
python benchmarks/matvec_routes.py --json "$OUT/matvec_routes.json"

# The README's memory picture: GPT-3 in fp16 at batch 64 and 544 tokens (the brief's example).
echo "memory: kvgen plan --preset gpt3-175b --dtype fp16 --batch 64 --prompt-len 512 \
--new-tokens 32 --plot docs/cache_memory.png" >> "$OUT/commands.txt"
kvgen plan --preset gpt3-175b --dtype fp16 --batch 64 --prompt-len 512 --new-tokens 32 \
    --plot docs/cache_memory.png > /dev/null

python benchmarks/make_results.py
