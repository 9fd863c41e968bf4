"""One epoch of rela.Loader on each rank of a torchrun job; each rank writes the indices and a
checksum of the pixels it read. Run by tests/data/test_remote.py:

    torchrun --standalone --nproc-per-node 2 tests/data/ddp_read.py SPEC OUT
"""

import json
import sys
import zlib
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: the checkout's rela

import rela  # noqa: E402

if __name__ == "__main__":
    spec, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    loader = rela.Loader(spec, 4, views="byol", image_size=16, seed=11, num_workers=2)
    seen = [(b["index"].tolist(), zlib.crc32(b["views"][1].numpy().tobytes())) for b in loader]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"seen": seen, "len": len(loader)}))
    dist.destroy_process_group()
