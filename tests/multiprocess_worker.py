"""One process of the two-process pretraining test (tests/test_multiprocess.py); not a test itself.

    python tests/multiprocess_worker.py DATA_DIR WORKDIR STEPS OUT_JSON

Joins the job described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (gloo CPU
collectives, the devices XLA_FLAGS gives this process), pretrains the tiny test model, and writes to
OUT_JSON the SHA-1 of every raw training image this process's input pipeline handed out.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    data_dir, workdir, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    from simclrv2_jax.train import parallel

    parallel.initialize_distributed()
    import jax

    from simclrv2_jax.config import get_config
    from simclrv2_jax.data import array_pipeline
    from simclrv2_jax.train import train_stage

    seen = []
    original = array_pipeline.train_batches

    def recording(*args, **kwargs):
        for batch in original(*args, **kwargs):
            seen.extend(hashlib.sha1(image.tobytes()).hexdigest() for image in batch["image"])
            yield batch

    array_pipeline.train_batches = recording
    from conftest import tiny

    config = tiny(
        get_config("pretrain", "fashion_mnist"),
        data_dir,
        train_steps=steps,
        augment_on_device=True,
        input_shards=2,
    )
    results = train_stage(config, workdir)
    with open(out, "w") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "local_devices": jax.local_device_count(),
                "devices": jax.device_count(),
                "final_step": results["final_step"],
                "images": seen,
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
