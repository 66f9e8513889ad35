#!/usr/bin/env bash
# Gu & Lee's full protocol for efficientnet_lite0 on one accelerator: the Kermany split
# (5,216 train / 624 test), 20 epochs, batch 64, seeds 0,1,2, strategies linear (frozen body,
# the paper's transfer), finetune and scratch, and the paper's learning rate x 0.1 variant
# (Table 3), through analysis/transfer_vs_scratch.py (resumable: rerun with the same OUT).
#
# Work: 3 strategies x 3 seeds x 20 epochs x 5,216 images, twice (two learning rates), of
# which linear trains on cached features (seconds): about 1.25 M end-to-end training images
# plus 2 x 9 x 20 evaluations of 624 test images and BatchNorm recomputation over the
# training images each epoch (about 1.1 M forward images). Estimate on one H100 (not
# measured here: no accelerator was lent when this was written): at 1,500-3,000 training
# images/s and 3x that for inference, 10-20 minutes of compute plus about 1 minute of
# compilation per strategy; on this project's 2-core CPU the same run takes days.
#
# Usage:
#   benchmarks/gpu_protocol.sh [OUT]           # the full protocol (default OUT: gpu_protocol/)
#   benchmarks/gpu_protocol.sh --tiny [OUT]    # a few minutes on a CPU: --quick subsets
#   benchmarks/gpu_protocol.sh --dry-run [OUT] # print the commands only
# Environment: DATA (default ../shared/data/chest_xray_kermany_224/chest_xray),
#   PYTHON (default python).
set -euo pipefail

mode=full
case "${1:-}" in
  --tiny) mode=tiny; shift ;;
  --dry-run) mode=dry; shift ;;
esac
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/gpu_protocol}"
data="${DATA:-$here/../shared/data/chest_xray_kermany_224/chest_xray}"
python="${PYTHON:-python}"

if [[ ! -d "$data/train" || ! -d "$data/test" ]]; then
  echo "gpu_protocol.sh: no Kermany split at $data (needs train/ and test/); set DATA" >&2
  [[ "$mode" == dry ]] || exit 2
fi

common=(--data "$data" --no-default-backbones --backbone efficientnet_lite0
        --runs "$out/runs" --out "$out/results" --resume)
if [[ "$mode" == tiny ]]; then
  args=(--quick "${common[@]}" --note "gpu_protocol.sh --tiny: CPU smoke run")
else
  args=(--seeds 0,1,2 --epochs 20 --batch-size 64 --lr-variant efficientnet_lite0
        "${common[@]}" --note "gpu_protocol.sh: the full protocol")
fi
cmd=("$python" "$here/analysis/transfer_vs_scratch.py" "${args[@]}")

echo "# $(date -u +%FT%TZ) mode=$mode out=$out"
echo "# devices: $("$python" -c 'import jax; print(jax.devices())' 2>/dev/null || echo unknown)"
printf '%q ' "${cmd[@]}"; echo
[[ "$mode" == dry ]] && exit 0
mkdir -p "$out"
start=$(date +%s)
"${cmd[@]}"
echo "# wall time: $(( $(date +%s) - start )) s; results in $out/results"
