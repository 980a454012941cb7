# Shared by the scripts that regenerate docs/results/ (ptq-results, finetune-results, ra-lora-results):
# the real checkpoint and text of ../shared/data, the qlora binary, a scratch directory with the text split
# 60 / 40 (the first part calibrates or trains, the rest is scored, so no method sees the evaluation text),
# and the helpers that read the tool's --json lines. Source it after `set -euo pipefail` with $script set to
# the caller's name.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
data=${QLORA_SHARED_DATA:-$root/../shared/data}
model=$data/models/stories260K/stories260K.bin
tok=$data/models/stories260K/tok512.bin
text=$data/text/tinystories/TinyStories-valid-subset.txt
[[ -f $model && -f $text ]] || { echo "$script: $model or $text not found (set QLORA_SHARED_DATA)" >&2; exit 1; }

# QLORA_BIN: that qlora binary; otherwise build the tool (QLORA_BUILD_DIR as for scripts/build).
if [[ -n ${QLORA_BIN:-} ]]; then
  qlora=$QLORA_BIN
else
  QLORA_TARGET=qlora_tool "$root/scripts/build" >/dev/null
  qlora=${QLORA_BUILD_DIR:-$root/build}/bin/qlora
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lines=$(wc -l <"$text")
head -n $((lines * 6 / 10)) "$text" >"$work/first60.txt"
tail -n +$((lines * 6 / 10 + 1)) "$text" >"$work/eval.txt"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
commit=$(git -C "$root" describe --always --abbrev=7 --dirty)  # -dirty: uncommitted changes

json_field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }
# ppl MODEL [FLAGS...]: perplexity on the held-out 40 % (GPTQ protocol, windows of 256 tokens)
ppl() { "$qlora" eval "$@" --tokenizer "$tok" --ppl "$work/eval.txt" --seq-len 256 --json | json_field ppl; }
fmt3() { LC_ALL=C printf '%.3f' "$1"; }
fmt0() { LC_ALL=C printf '%.0f' "$1"; }
# train NAME FLAGS... -> `qlora train MODEL ${common[@]} FLAGS...` into $work/NAME (the caller sets `common`);
# prints "ppl seconds trainable_parameters" (the adapter's held-out perplexity, from summary.json the rest)
train() {
  local name=$1; shift
  local dir=$work/$name
  local summary
  summary=$("$qlora" train "$model" "${common[@]}" "$@" --out "$dir" 2>"$work/$name.log") ||
    { echo "$script: qlora train $* failed:" >&2; cat "$work/$name.log" >&2; exit 1; }
  printf '%s %s %s\n' "$(ppl "$model" --adapter "$dir/adapter")" "$(json_field seconds <<<"$summary")" \
    "$(json_field trainable_parameters <<<"$summary")"
}
