"""The production test's job entrypoint: what jobs/pipeline.py runs, with one fault injected through the
worker seam (StageWorker.before_step): rank 1 of stage KILL_STAGE SIGKILLs itself before step KILL_STEP, once
(only in an attempt that did not resume). Submitted with `ray job submit --working-dir`, so the training
workers on the other node import this module from the job's working directory.

    python -m tests.prod_job --recipe R --pipeline-id ID
"""

from __future__ import annotations

import argparse
import os
import signal

from raylong.log import get_logger
from raylong.train.worker import StageWorker

KILL_STAGE, KILL_STEP = "cp_512", 5


class KillRank1Once(StageWorker):
    def setup(self) -> None:
        super().setup()
        if self.rank == 0:  # torch's TCPStore listens here, on the wildcard address: the test allows exactly it
            get_logger(__name__).info("TCPStore of this training group: pid %d port %s", os.getpid(),
                                      os.environ.get("MASTER_PORT"))

    def before_step(self, step: int) -> None:
        if self.stage.name == KILL_STAGE and step == KILL_STEP and self.rank == 1 and self.start_step == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    import ray

    from raylong.config import load_recipe
    from raylong.pipeline.context import ensure_ray
    from raylong.pipeline.runner import run_pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--pipeline-id", required=True)
    args = parser.parse_args()
    ensure_ray()
    # the test checks the driver joined the cluster the job was submitted to, not another one on this host
    get_logger(__name__).info("job driver joined the Ray cluster at %s", ray.get_runtime_context().gcs_address)
    run_pipeline(load_recipe(args.recipe), args.pipeline_id, worker_cls=KillRank1Once)


if __name__ == "__main__":
    main()
