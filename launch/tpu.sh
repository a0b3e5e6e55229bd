#!/usr/bin/env bash
# Runs a stage on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods included).
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b bash launch/tpu.sh \
#       --config=configs/pretrain.py:imagenet,r50_2x_sk1 --workdir=gs://my-bucket/r50_2x_sk1/pretrain
#
# Copies this checkout to ~/simclrv2_jax on all workers, installs it with the TPU extra (first run
# only), then starts `python -m simclrv2_jax.main ARGS` on all workers at once; each joins the job
# through jax.distributed.initialize() and reads its own shard of the data. Put workdir and data on
# GCS (gs://...) so every worker sees them; TFDS_DATA_DIR / --config.data_dir=gs://... for the data.
# MODULE=simclrv2_jax.run_all runs the whole pipeline instead of one stage.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
MODULE="${MODULE:-simclrv2_jax.main}"
REMOTE_DIR="${REMOTE_DIR:-simclrv2_jax}"
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then
  echo "usage: TPU_NAME=... ZONE=... bash launch/tpu.sh --config=CONFIG[:presets] --workdir=gs://..." >&2
  exit 2
fi

tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

echo "[tpu] copying the project to all workers of $TPU_NAME"
archive=$(mktemp /tmp/simclrv2_jax.XXXXXX.tar.gz)
git ls-files -z | tar --null -czf "$archive" -T -
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/simclrv2_jax.tar.gz --zone="$ZONE" $PROJECT_FLAG --worker=all
rm -f "$archive"

echo "[tpu] installing (skipped where already done)"
tpu_ssh "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/simclrv2_jax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && \
  bash launch/setup.sh && .venv/bin/pip install -q -e '.[tpu]'"

args=$(printf '%q ' "$@")
echo "[tpu] starting $MODULE on all workers: $args"
tpu_ssh "cd ~/$REMOTE_DIR && SIMCLR_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m $MODULE $args"
