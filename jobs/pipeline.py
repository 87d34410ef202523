"""`ray job submit -- python jobs/pipeline.py --recipe jobs/recipes/tiny.yaml [--pipeline-id ID]`

Runs (or resumes) the recipe's stage chain on the Ray cluster the job was submitted to.
"""

import sys

from raylong.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
