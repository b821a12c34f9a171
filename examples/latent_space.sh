#!/usr/bin/env bash
# The classic three-panel picture of a 2-D latent space, on procedural digits:
#   reconstruction only (beta = 0, a plain autoencoder): clusters with gaps between them;
#   KL only (beta = 1000, the reconstruction term negligible): one blob, no structure;
#   the full ELBO (beta = 1): clusters that fill a complete, continuous space.
# Usage: examples/latent_space.sh [OUT_DIR]     (default out/latent_space)
# Each of the three models trains for STEPS steps (default 2000: the same pictures on every machine) or TIME
# (default 4m), whichever comes first; about 2 minutes each on an idle 2-core CPU.
set -euo pipefail

OUT=${1:-out/latent_space}
STEPS=${STEPS:-2000}
TIME=${TIME:-4m}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(dirname "$(command -v vaetool)")
PYTHON=${PYTHON:-$([ -x "$BIN/python" ] && echo "$BIN/python" || echo python3)}  # the one vaetool runs on

mkdir -p "$OUT"
# One font, varied weight, slant, rotation and position: each class varies continuously.
"$PYTHON" "$HERE/digits.py" "$OUT/digits" --count 3000 --size 32 --seed 0 --fonts 1 --variety 0.7 > /dev/null
LABELS="$OUT/digits/labels.csv:digit"
# Bernoulli likelihood, as in the classic MNIST pictures (the digits are nearly binary).
MODEL=(--image-size 32 --widths 16,32,64 --blocks 0 --latent-dim 2 --likelihood bernoulli --batch-size 64 --seed 0
       --steps "$STEPS" --time "$TIME")

# The maps use each run's last weights: model.safetensors is the best by validation -ELBO, which is not
# what the reconstruction-only and KL-only objectives aim at.
train_and_map() {  # run name, beta, panel title
    echo "training $1 (beta = $2): $STEPS steps or $TIME ..." >&2
    vaetool train "$OUT/digits" -o "$OUT/$1" --beta "$2" "${MODEL[@]}" --force -q > /dev/null
    vaetool latent-map "$OUT/$1/last.safetensors" "$OUT/digits" -o "$OUT/$1.png" --color-by "$LABELS" --size 700 \
        --title "$3" --force -q > /dev/null
}
train_and_map recon_only 0 "reconstruction only (beta = 0)"
train_and_map kl_only 1000 "KL only (beta = 1000)"
train_and_map elbo 1 "reconstruction + KL: the ELBO (beta = 1)"
vaetool latent-map "$OUT/elbo/last.safetensors" "$OUT/digits" -o "$OUT/elbo_thumbnails.png" --size 900 --cells 28 \
    --title "the ELBO model's latent space: each image at its posterior mean" --force -q > /dev/null

# The three maps side by side.
"$PYTHON" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from PIL import Image

out = Path(sys.argv[1])
panels = [Image.open(out / f"{name}.png").convert("RGB") for name in ("recon_only", "kl_only", "elbo")]
canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
x = 0
for panel in panels:
    canvas.paste(panel, (x, (canvas.height - panel.height) // 2))
    x += panel.width
canvas.save(out / "three_panels.png")
EOF
echo "$OUT/three_panels.png"
echo "$OUT/elbo_thumbnails.png"
